//! State dicts under PyTorch names, read from and written to safetensors.
//!
//! Our parameter paths are PyTorch's, except where a reference's spelling or naming differs
//! from ours; each layout has one explicit [`NameTable`] for that:
//!
//! | ours | official (axial-deeplab) | seed (Stand-Alone-Axial-Attention) |
//! |---|---|---|
//! | `height_block` | `hight_block` (sic) | `height_block` |
//! | `qkv_transform` | `qkv_transform` | `kqv_conv` |
//! | `bn_qkv` | `bn_qkv` | `kqv_bn` |
//! | `bn_similarity` | `bn_similarity` | `logits_bn` |
//! | `relative` | `relative` | `rel_encoding` |
//! | (derived index) | `flatten_index` | `distance_matrix` |
//!
//! The index buffers are derived from the table size, so they are written on export and, when a
//! file has them, checked on import (a wrong one means a file of another layout). A
//! `module.` prefix (DataParallel/DDP) is stripped. A missing `num_batches_tracked` is allowed
//! (PyTorch before 0.4.1 had none; it does not enter the maths at momentum 0.1).
//! Anything else missing, unexpected, mis-shaped or of a non-convertible dtype fails the whole
//! load, listing every offending key, and leaves the model untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use axial_common::Variant;
use tch::{Kind, Tensor};

use super::Model;
use crate::error::{Error, Result};

/// How one layout names what we name differently.
#[derive(Debug, Clone, Copy)]
pub struct NameTable {
    pub variant: Variant,
    /// (our segment, their segment), applied to each dot-separated segment.
    renames: &'static [(&'static str, &'static str)],
    /// Name of the derived relative-index buffer of each attention layer.
    index_buffer: Option<&'static str>,
}

const OFFICIAL: NameTable = NameTable {
    variant: Variant::Official,
    renames: &[("height_block", "hight_block")],
    index_buffer: Some("flatten_index"),
};

const SEED: NameTable = NameTable {
    variant: Variant::Seed,
    renames: &[
        ("qkv_transform", "kqv_conv"),
        ("bn_qkv", "kqv_bn"),
        ("bn_similarity", "logits_bn"),
        ("relative", "rel_encoding"),
    ],
    index_buffer: Some("distance_matrix"),
};

const RESNET: NameTable = NameTable {
    variant: Variant::Resnet,
    renames: &[],
    index_buffer: None,
};

impl NameTable {
    pub fn for_variant(variant: Variant) -> Self {
        match variant {
            Variant::Official => OFFICIAL,
            Variant::Seed => SEED,
            Variant::Resnet => RESNET,
        }
    }

    /// Our name -> the layout's PyTorch name.
    pub fn external(&self, ours: &str) -> String {
        self.map(ours, |(o, t)| (o, t))
    }

    /// The layout's PyTorch name -> ours.
    pub fn internal(&self, theirs: &str) -> String {
        self.map(theirs, |(o, t)| (t, o))
    }

    fn map(
        &self,
        name: &str,
        dir: fn((&'static str, &'static str)) -> (&'static str, &'static str),
    ) -> String {
        name.split('.')
            .map(|seg| {
                self.renames
                    .iter()
                    .map(|&pair| dir(pair))
                    .find(|(from, _)| *from == seg)
                    .map_or(seg, |(_, to)| to)
            })
            .collect::<Vec<_>>()
            .join(".")
    }
}

/// Everything that kept a state dict from fitting a model.
#[derive(Debug, Default)]
pub struct Mismatch {
    pub missing: Vec<String>,
    pub unexpected: Vec<String>,
    /// (name, model shape, file shape)
    pub shapes: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// (name, model dtype, file dtype)
    pub kinds: Vec<(String, Kind, Kind)>,
    /// Index buffers whose values are not those of this layout.
    pub wrong_index: Vec<String>,
}

impl Mismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.shapes.is_empty()
            && self.kinds.is_empty()
            && self.wrong_index.is_empty()
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        if !self.missing.is_empty() {
            lines.push(format!(
                "  missing keys ({}): {}",
                self.missing.len(),
                self.missing.join(", ")
            ));
        }
        if !self.unexpected.is_empty() {
            lines.push(format!(
                "  unexpected keys ({}): {}",
                self.unexpected.len(),
                self.unexpected.join(", ")
            ));
        }
        for (name, want, got) in &self.shapes {
            lines.push(format!(
                "  shape of {name}: model has {want:?}, file has {got:?}"
            ));
        }
        for (name, want, got) in &self.kinds {
            lines.push(format!(
                "  dtype of {name}: model has {want:?}, file has {got:?}"
            ));
        }
        for name in &self.wrong_index {
            lines.push(format!(
                "  {name}: relative index of another layout or span (wrong variant or span?)"
            ));
        }
        write!(f, "{}", lines.join("\n"))
    }
}

fn is_float(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16
    )
}

impl Model {
    fn names(&self) -> NameTable {
        NameTable::for_variant(self.net.config().variant)
    }

    /// The trainable parameters under the layout's PyTorch names, sorted by name (the order
    /// every rank and every checkpoint uses).
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let names = self.names();
        let mut params: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (names.external(&n), t))
            .collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        params
    }

    /// The full state dict under the layout's PyTorch names, sorted: parameters, running
    /// statistics, `num_batches_tracked` and the derived index buffers.
    pub fn state_dict(&self) -> Vec<(String, Tensor)> {
        let names = self.names();
        let mut out: BTreeMap<String, Tensor> = self
            .vs
            .variables()
            .into_iter()
            .map(|(name, t)| (names.external(&name), t.detach()))
            .collect();
        if let Some(buffer) = names.index_buffer {
            for layer in self.net.attention_layers() {
                let name = names.external(&format!("{}.{buffer}", layer.path()));
                out.insert(name, layer.index_buffer());
            }
        }
        out.into_iter().collect()
    }

    /// Copies a state dict into the model, all or nothing (see the module docs).
    pub fn load_state_dict(&self, entries: Vec<(String, Tensor)>) -> Result<(), Mismatch> {
        let names = self.names();
        let vars = self.vs.variables();
        let index: BTreeMap<String, Tensor> = match names.index_buffer {
            Some(buffer) => self
                .net
                .attention_layers()
                .iter()
                .map(|l| {
                    (
                        names.external(&format!("{}.{buffer}", l.path())),
                        l.index_buffer(),
                    )
                })
                .collect(),
            None => BTreeMap::new(),
        };
        let mut report = Mismatch::default();
        let mut staged = Vec::new();
        let mut seen = BTreeSet::new();
        for (name, tensor) in entries {
            let name = name.strip_prefix("module.").unwrap_or(&name).to_owned();
            if let Some(expected) = index.get(&name) {
                if tensor.size() != expected.size()
                    || tensor.kind() != Kind::Int64
                    || !tensor.to_device(expected.device()).equal(expected)
                {
                    report.wrong_index.push(name);
                }
                continue;
            }
            let ours = names.internal(&name);
            let Some(var) = vars.get(&ours) else {
                report.unexpected.push(name);
                continue;
            };
            if !seen.insert(ours.clone()) {
                report.unexpected.push(format!("{name} (given twice)"));
                continue;
            }
            if var.size() != tensor.size() {
                report.shapes.push((name, var.size(), tensor.size()));
                continue;
            }
            if is_float(var.kind()) != is_float(tensor.kind()) {
                report.kinds.push((name, var.kind(), tensor.kind()));
                continue;
            }
            staged.push((var.shallow_clone(), tensor));
        }
        for ours in vars.keys() {
            if !seen.contains(ours) && !ours.ends_with(".num_batches_tracked") {
                report.missing.push(names.external(ours));
            }
        }
        report.missing.sort();
        if !report.is_empty() {
            return Err(report);
        }
        tch::no_grad(|| {
            for (mut var, tensor) in staged {
                var.copy_(&tensor.to_kind(var.kind()).to_device(var.device()));
            }
        });
        Ok(())
    }

    /// Loads a safetensors state dict (see [`Self::load_state_dict`]).
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let entries = Tensor::read_safetensors(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        self.load_state_dict(entries)
            .map_err(|report| Error::WeightsMismatch {
                path: path.to_owned(),
                variant: self.names().variant.as_str(),
                report: Box::new(report),
            })
    }

    /// Writes the state dict as safetensors, atomically: a temp file beside `path`, then a
    /// rename, so an existing file is never left half-written.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        write_tensors_atomic(path, &self.state_dict())
    }
}

/// Writes named tensors to a safetensors file through a temp file and a rename.
pub fn write_tensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let tmp: PathBuf = {
        let mut name = path
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_default();
        name.push(format!(".tmp{}", std::process::id()));
        path.with_file_name(name)
    };
    let contiguous: Vec<(&str, Tensor)> = tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.to_device(tch::Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&contiguous, &tmp).map_err(|e| Error::Write {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let sync = std::fs::File::open(&tmp).and_then(|f| f.sync_all());
    sync.and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| {
            let _ = std::fs::remove_file(&tmp);
            Error::Write {
                path: path.to_owned(),
                source,
            }
        })
}
