//! libtorch's operator profiler (Kineto, CPU activities), for the benches: which operators a
//! training step spends its time in, by self time (an operator's time less the operators it
//! called), grouped by name and input shapes.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int};
use std::path::Path;

use crate::shim;

#[allow(unsafe_code)]
mod ffi {
    use super::{c_char, c_int};
    unsafe extern "C" {
        pub fn axial_profiler_start(shapes: c_int, err: *mut c_char, len: usize) -> c_int;
        pub fn axial_profiler_stop(path: *const c_char, err: *mut c_char, len: usize) -> c_int;
    }
}

/// Starts recording every operator this process runs (with input shapes when `shapes`).
#[allow(unsafe_code)]
pub fn start(shapes: bool) -> Result<(), String> {
    // SAFETY: the shim writes at most len bytes into the error buffer and keeps no pointer.
    shim::call(|err, len| unsafe { ffi::axial_profiler_start(c_int::from(shapes), err, len) })
}

/// Stops recording and writes the events to `path`, one per line:
/// `thread \t start ns \t end ns \t name \t shapes`.
#[allow(unsafe_code)]
pub fn stop(path: &Path) -> Result<(), String> {
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: a path with a NUL byte", path.display()))?;
    // SAFETY: a NUL-terminated path alive for the call; the error buffer as above.
    shim::call(|err, len| unsafe { ffi::axial_profiler_stop(c_path.as_ptr(), err, len) })
}

/// One row of [`summary`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    pub name: String,
    pub shapes: String,
    pub calls: usize,
    pub self_ns: u64,
}

/// Self time per (name, shapes), largest first, from the text [`stop`] wrote. An event's self
/// time is its duration less that of the events nested directly inside it on its thread.
pub fn summary(events: &str) -> Result<Vec<OpTime>, String> {
    struct Event<'a> {
        thread: u64,
        start: u64,
        end: u64,
        key: (&'a str, &'a str),
    }
    let mut list = Vec::new();
    for (i, line) in events.lines().enumerate() {
        let f: Vec<&str> = line.splitn(5, '\t').collect();
        let bad = || {
            format!(
                "profile line {}: not thread, start, end, name, shapes",
                i + 1
            )
        };
        if f.len() != 5 {
            return Err(bad());
        }
        let num = |s: &str| s.parse::<u64>().map_err(|_| bad());
        list.push(Event {
            thread: num(f[0])?,
            start: num(f[1])?,
            end: num(f[2])?.max(num(f[1])?),
            key: (f[3], f[4]),
        });
    }
    // Per thread, outer events first: by start, then the longer one.
    list.sort_by_key(|e| (e.thread, e.start, std::cmp::Reverse(e.end)));
    let mut totals: HashMap<(&str, &str), (usize, u64)> = HashMap::new();
    let mut self_ns = vec![0u64; list.len()];
    // Open events: (index, end).
    let mut open: Vec<usize> = Vec::new();
    for (i, e) in list.iter().enumerate() {
        while let Some(&top) = open.last() {
            let t = &list[top];
            if t.thread == e.thread && e.start < t.end {
                break;
            }
            open.pop();
        }
        self_ns[i] = e.end - e.start;
        if let Some(&parent) = open.last() {
            let child = e.end.min(list[parent].end) - e.start;
            self_ns[parent] = self_ns[parent].saturating_sub(child);
        }
        open.push(i);
    }
    for (e, s) in list.iter().zip(&self_ns) {
        let t = totals.entry(e.key).or_default();
        t.0 += 1;
        t.1 += s;
    }
    let mut rows: Vec<OpTime> = totals
        .into_iter()
        .map(|((name, shapes), (calls, self_ns))| OpTime {
            name: name.to_owned(),
            shapes: shapes.to_owned(),
            calls,
            self_ns,
        })
        .collect();
    rows.sort_by(|a, b| b.self_ns.cmp(&a.self_ns).then_with(|| a.name.cmp(&b.name)));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_time_excludes_nested_calls() {
        // Thread 1: a conv [0, 100) calling an empty [10, 20) and a matmul [30, 70) that calls
        // an empty [40, 45); thread 2: an add [0, 50) overlapping in time but not nested.
        let events = "1\t0\t100\tconv\t[1,2]\n1\t10\t20\tempty\t\n1\t30\t70\tmm\t[2,2] [2,2]\n\
                      1\t40\t45\tempty\t\n2\t0\t50\tadd\t[3]\n";
        let rows = summary(events).expect("well-formed events");
        let get = |n: &str| rows.iter().find(|r| r.name == n).expect("a row per name");
        assert_eq!(get("conv").self_ns, 50);
        assert_eq!(get("mm").self_ns, 35);
        assert_eq!((get("empty").calls, get("empty").self_ns), (2, 15));
        assert_eq!(get("add").self_ns, 50);
        // Largest first; ties by name.
        assert_eq!(
            (rows[0].name.as_str(), rows[1].name.as_str()),
            ("add", "conv")
        );
        assert!(
            summary("1\t0\tx\tconv\t\n")
                .expect_err("a bad end time")
                .contains("line 1")
        );
    }

    #[test]
    fn the_profiler_records_operators() {
        let path = std::env::temp_dir().join(format!("axial-profile-{}.tsv", std::process::id()));
        start(true).expect("profiler starts");
        let x = tch::Tensor::ones([4, 4], (tch::Kind::Float, tch::Device::Cpu));
        let _ = x.matmul(&x);
        stop(&path).expect("profiler stops");
        let text = std::fs::read_to_string(&path).expect("events written");
        let _ = std::fs::remove_file(&path);
        let rows = summary(&text).expect("well-formed events");
        let mm = rows
            .iter()
            .find(|r| r.name == "aten::matmul")
            .expect("matmul recorded");
        assert_eq!(mm.shapes, "[4,4] [4,4]");
    }
}
