//! Parity against exact values: what the parity tests (`worker/tests/parity.rs`,
//! `tests/tests/forward_cli.rs`) hold our float32 results to.
//!
//! The exact values come from other code: the PyTorch twin (`scripts/pytorch/axial_twin.py`,
//! checked against the authors' own numbers by `check_fixtures.py`) run in float64 by
//! `scripts/pytorch/parity_fixtures.py`, one file per case (a layout, an input size, a batch).
//! Each file also holds, per result, how far PyTorch's own float32 runs of the same model land
//! from the exact value (`pt32.<key>`). A result of ours passes when
//!
//! ```text
//! |ours - exact| <= 3 |pytorch32 - exact| + 1e-6 max|exact|
//! ```
//!
//! and, for a gradient that is zero in exact arithmetic (bn_similarity's bias under the
//! softmax: pure rounding in any float32 run), `|ours| <= max(3 |pytorch32|, 1e-7 G)` with G
//! the model's largest gradient. The bound is built from the exact values and PyTorch's
//! rounding only, never from the value under test. `num_batches_tracked` must match exactly.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tch::{Kind, Tensor};

/// Ours may be this many times farther from the exact value than PyTorch's float32.
pub const PYTORCH_FACTOR: f64 = 3.0;
/// Plus this fraction of the tensor's largest exact value (a few float32 ulps).
pub const SCALE_FRACTION: f64 = 1e-6;
/// A gradient below this fraction of the model's largest gradient is zero in exact arithmetic.
pub const ZERO_GRADIENT: f64 = 1e-9;
/// The floor for such a gradient, as a fraction of the model's largest gradient.
pub const ZERO_FLOOR: f64 = 1e-7;

/// One case of `parity_fixtures.py`: the inputs and the exact results.
#[derive(Debug)]
pub struct Fixture {
    pub case: String,
    /// The `[model]` table.
    pub model: String,
    /// Weights and norm statistics under the layout's PyTorch names (float32).
    pub state: Vec<(String, Tensor)>,
    pub input: Tensor,
    pub labels: Tensor,
    /// `logits_eval`, `logits_train`, `loss`, `grad.<name>`, `after_train.<name>`, float64.
    pub exact: HashMap<String, Tensor>,
    /// max |PyTorch float32 - exact| per key.
    pub pytorch32: HashMap<String, f64>,
}

impl Fixture {
    /// Reads `<dir>/<case>.safetensors`.
    pub fn load(dir: &Path, case: &str) -> Result<Self, String> {
        let path = dir.join(format!("{case}.safetensors"));
        let tensors = Tensor::read_safetensors(&path)
            .map_err(|e| format!("parity fixture {}: {e}", path.display()))?;
        let model = safetensors_metadata(&path)?
            .remove("model")
            .ok_or_else(|| format!("{}: no `model` in the metadata", path.display()))?;
        let mut fx = Fixture {
            case: case.to_owned(),
            model,
            state: Vec::new(),
            input: Tensor::new(),
            labels: Tensor::new(),
            exact: HashMap::new(),
            pytorch32: HashMap::new(),
        };
        for (name, t) in tensors {
            if let Some(n) = name.strip_prefix("state.") {
                fx.state.push((n.to_owned(), t));
            } else if let Some(n) = name.strip_prefix("exact.") {
                fx.exact.insert(n.to_owned(), t);
            } else if let Some(n) = name.strip_prefix("pt32.") {
                fx.pytorch32.insert(n.to_owned(), t.double_value(&[0]));
            } else if name == "input" {
                fx.input = t;
            } else if name == "labels" {
                fx.labels = t;
            }
        }
        if !fx.input.defined() || !fx.labels.defined() || fx.exact.is_empty() {
            return Err(format!(
                "{}: not a parity fixture (input, labels and exact.* needed)",
                path.display()
            ));
        }
        Ok(fx)
    }

    /// The model's largest exact gradient (the scale of the floor for zero gradients).
    pub fn largest_gradient(&self) -> f64 {
        self.exact
            .iter()
            .filter(|(k, _)| k.starts_with("grad."))
            .map(|(_, t)| max_abs(t))
            .fold(0.0, f64::max)
    }

    /// Compares `ours` (keys as in [`Self::exact`]; missing keys fail) with the exact values.
    pub fn compare(&self, ours: &HashMap<String, Tensor>) -> Report {
        let largest = self.largest_gradient();
        let mut keys: Vec<&String> = self.exact.keys().collect();
        keys.sort();
        let rows = keys
            .into_iter()
            .map(|key| match ours.get(key) {
                Some(value) => self.row(key, value, largest),
                None => Row::missing(key),
            })
            .collect();
        Report {
            case: self.case.clone(),
            rows,
        }
    }

    /// Compares one result with its exact value (`largest`: [`Self::largest_gradient`]).
    pub fn row(&self, key: &str, value: &Tensor, largest: f64) -> Row {
        let Some(exact) = self.exact.get(key) else {
            return Row {
                key: key.to_owned(),
                error: f64::INFINITY,
                bound: 0.0,
                note: "no exact value".to_owned(),
            };
        };
        if value.size() != exact.size() {
            return Row {
                key: key.to_owned(),
                error: f64::INFINITY,
                bound: 0.0,
                note: format!("shape {:?}, exact {:?}", value.size(), exact.size()),
            };
        }
        if !exact.is_floating_point() {
            let equal = value.to_kind(exact.kind()).equal(exact);
            return Row {
                key: key.to_owned(),
                error: if equal { 0.0 } else { f64::INFINITY },
                bound: 0.0,
                note: if equal {
                    String::new()
                } else {
                    format!("{value} != {exact}").replace('\n', " ")
                },
            };
        }
        let error = max_abs_diff(value, exact);
        let scale = max_abs(exact);
        let pytorch = self.pytorch32.get(key).copied().unwrap_or(0.0);
        let zero = key.starts_with("grad.") && scale < ZERO_GRADIENT * largest;
        let bound = if zero {
            (PYTORCH_FACTOR * pytorch).max(ZERO_FLOOR * largest)
        } else {
            PYTORCH_FACTOR * pytorch + SCALE_FRACTION * scale
        };
        Row {
            key: key.to_owned(),
            error,
            bound,
            note: format!(
                "pytorch32 {pytorch:.2e}, scale {scale:.2e}{}",
                if zero {
                    ", zero in exact arithmetic"
                } else {
                    ""
                }
            ),
        }
    }
}

/// One compared result.
#[derive(Debug, Clone)]
pub struct Row {
    pub key: String,
    pub error: f64,
    pub bound: f64,
    pub note: String,
}

impl Row {
    fn missing(key: &str) -> Self {
        Row {
            key: key.to_owned(),
            error: f64::INFINITY,
            bound: 0.0,
            note: "missing from our results".to_owned(),
        }
    }

    pub fn passes(&self) -> bool {
        self.error <= self.bound
    }

    /// error / bound (0 for an exact match).
    pub fn ratio(&self) -> f64 {
        if self.error == 0.0 {
            0.0
        } else {
            self.error / self.bound
        }
    }
}

/// The rows of one comparison; printed as the worst rows and the failures.
#[derive(Debug, Clone)]
pub struct Report {
    pub case: String,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn failures(&self) -> Vec<&Row> {
        self.rows.iter().filter(|r| !r.passes()).collect()
    }

    pub fn worst(&self) -> Option<&Row> {
        self.rows
            .iter()
            .max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows: Vec<&Row> = self.rows.iter().collect();
        rows.sort_by(|a, b| b.ratio().total_cmp(&a.ratio()));
        let failed = self.failures().len();
        writeln!(
            f,
            "{}: {} results, {failed} outside the bound; worst error / bound:",
            self.case,
            self.rows.len()
        )?;
        for r in rows.iter().take(failed.max(5)) {
            writeln!(
                f,
                "  {} {:<58} error {:.3e}  bound {:.3e}  ({:.2}; {})",
                if r.passes() { "ok  " } else { "FAIL" },
                r.key,
                r.error,
                r.bound,
                r.ratio(),
                r.note
            )?;
        }
        Ok(())
    }
}

fn max_abs(t: &Tensor) -> f64 {
    if t.numel() == 0 {
        return 0.0;
    }
    t.to_kind(Kind::Double).abs().max().double_value(&[])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.numel() == 0 {
        return 0.0;
    }
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The `__metadata__` of a safetensors file (tch reads tensors only).
fn safetensors_metadata(path: &Path) -> Result<HashMap<String, String>, String> {
    use std::io::Read;
    let fail = |e: String| format!("{}: {e}", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| fail(e.to_string()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(fail(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| fail(e.to_string()))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| fail(e.to_string()))?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect()
        })
        .unwrap_or_default())
}

/// The Python of the torch venv `scripts/setup-libtorch.sh` made (`AXIAL_PYTHON` overrides):
/// `<LIBTORCH>/../../../../bin/python`, LIBTORCH being the venv's `site-packages/torch`.
pub fn venv_python(checkout: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("AXIAL_PYTHON") {
        return PathBuf::from(p);
    }
    let torch = std::env::var_os("LIBTORCH")
        .map(PathBuf::from)
        .unwrap_or_else(|| checkout.join(".libtorch"));
    let torch = std::fs::canonicalize(&torch).unwrap_or(torch);
    torch.join("../../../../bin/python")
}

/// Writes (or finds, up to date) every case of `parity_fixtures.py` in `dir`, once per
/// process; returns `dir`. The script keeps files whose source hash matches (~0.1 s).
pub fn ensure_fixtures(checkout: &Path, dir: &Path) -> Result<PathBuf, String> {
    static DONE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.as_deref() == Some(dir) {
        return Ok(dir.to_owned());
    }
    let python = venv_python(checkout);
    let script = checkout.join("scripts/pytorch/parity_fixtures.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} (the torch venv's Python; scripts/setup-libtorch.sh makes it, \
                 AXIAL_PYTHON overrides): {e}",
                python.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "{} {} {} failed ({}):\n{}",
            python.display(),
            script.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    *done = Some(dir.to_owned());
    Ok(dir.to_owned())
}

/// The case names of `parity_fixtures.py` (`--list`).
pub fn cases(checkout: &Path) -> Result<Vec<String>, String> {
    let python = venv_python(checkout);
    let out = Command::new(&python)
        .arg(checkout.join("scripts/pytorch/parity_fixtures.py"))
        .arg("--list")
        .env("PYTHONWARNINGS", "ignore")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Fixture {
        let exact = |v: &[f64]| Tensor::from_slice(v);
        Fixture {
            case: "unit".into(),
            model: String::new(),
            state: Vec::new(),
            input: Tensor::new(),
            labels: Tensor::new(),
            exact: [
                ("grad.w".to_owned(), exact(&[1.0, -2.0])),
                ("grad.zero".to_owned(), exact(&[0.0])),
                (
                    "after_train.n".to_owned(),
                    Tensor::from_slice(&[3i64]).reshape([0i64; 0]),
                ),
            ]
            .into_iter()
            .collect(),
            pytorch32: [("grad.w".to_owned(), 1e-5), ("grad.zero".to_owned(), 1e-9)]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn the_bound_comes_from_pytorch_and_the_exact_values_only() {
        let fx = fixture();
        let ours = |w: &[f32], z: f32, n: i64| -> HashMap<String, Tensor> {
            [
                ("grad.w".to_owned(), Tensor::from_slice(w)),
                ("grad.zero".to_owned(), Tensor::from_slice(&[z])),
                (
                    "after_train.n".to_owned(),
                    Tensor::from_slice(&[n]).reshape([0i64; 0]),
                ),
            ]
            .into_iter()
            .collect()
        };
        // 3 x 1e-5 + 1e-6 x 2 = 3.2e-5 for grad.w; max(3e-9, 1e-7 x 2) = 2e-7 for the zero one.
        let report = fx.compare(&ours(&[1.00003, -2.0], 1.9e-7, 3));
        assert!(report.failures().is_empty(), "{report}");
        let report = fx.compare(&ours(&[1.000034, -2.0], 0.0, 3));
        assert_eq!(report.failures().len(), 1, "{report}");
        let report = fx.compare(&ours(&[1.0, -2.0], 2.1e-7, 3));
        assert_eq!(report.failures()[0].key, "grad.zero", "{report}");
        let report = fx.compare(&ours(&[1.0, -2.0], 0.0, 4));
        assert_eq!(report.failures()[0].key, "after_train.n", "{report}");
        let mut partial = ours(&[1.0, -2.0], 0.0, 3);
        partial.remove("grad.w");
        assert_eq!(fx.compare(&partial).failures()[0].key, "grad.w");
    }
}
