//! Helpers for the end-to-end tests in `tests/tests/`: they run the real binaries, each test in
//! its own temp dir, and check what a user would check.
//!
//! The binaries are found beside the test executable (`target/<profile>/`); `scripts/test.sh`
//! builds them (`cargo build --workspace --bins`) before running the tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of a workspace binary built by the same `cargo test` run.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// The checkout the tests run from. `cargo test` names this crate's directory at run time;
/// the path baked in at compile time is only the fallback (a test executable run by hand),
/// because a target dir shared by checkouts at other paths (CI's cache) reuses executables
/// built elsewhere, whose baked path may not exist here.
pub fn repo_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
}

/// The shared parity fixtures (`../shared/fixtures` beside the checkout, or `AXIAL_FIXTURES`).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("AXIAL_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/fixtures"))
}

/// Runs a command and returns its output; prints both streams so a failing test shows them.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    println!(
        "$ {cmd:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Reads lines until one contains `needle`; returns every line read.
pub fn until(rx: &std::sync::mpsc::Receiver<String>, needle: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let line = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .unwrap_or_else(|_| panic!("no line with {needle:?}; saw {seen:#?}"));
        let hit = line.contains(needle);
        seen.push(line);
        if hit {
            return seen;
        }
    }
}

pub fn wait_ok(child: &mut std::process::Child, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{what} failed: {status}");
            return;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not finish");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Per-sample exactly-once, from the workers' sample logs (`[data] log_samples`): every line is
/// `<generation> <epoch> <step> <index>...`. A generation that resumed from step R rolled back
/// every earlier generation's steps after R; what remains must hold each of the `n` samples of
/// each of the `epochs` epochs exactly once.
pub fn assert_each_sample_once(dir: &Path, epochs: u64, n: usize) {
    let mut lines: Vec<(u64, u64, u64, Vec<usize>)> = Vec::new();
    for entry in std::fs::read_dir(dir.join("ckpt/samples")).expect("sample logs") {
        let text = std::fs::read_to_string(entry.expect("entry").path()).expect("log");
        for line in text.lines() {
            let v: Vec<u64> = line
                .split(' ')
                .map(|x| x.parse().expect("number"))
                .collect();
            lines.push((
                v[0],
                v[1],
                v[2],
                v[3..].iter().map(|&x| x as usize).collect(),
            ));
        }
    }
    // Where each generation resumed: one step before its first.
    let mut resumed_at = std::collections::BTreeMap::new();
    for (g, _, step, _) in &lines {
        let r = resumed_at.entry(*g).or_insert(u64::MAX);
        *r = (*r).min(step - 1);
    }
    let kept = lines
        .iter()
        .filter(|(g, _, step, _)| !resumed_at.range(g + 1..).any(|(_, &r)| *step > r));
    let mut seen = vec![vec![0u32; n]; epochs as usize];
    for (_, epoch, _, ids) in kept {
        for &i in ids {
            seen[*epoch as usize][i] += 1;
        }
    }
    for (e, counts) in seen.iter().enumerate() {
        let wrong: Vec<(usize, u32)> = counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c != 1)
            .map(|(i, c)| (i, *c))
            .collect();
        assert!(
            wrong.is_empty(),
            "epoch {e}: (sample, times consumed) {wrong:?}"
        );
    }
    println!(
        "sample logs: {} lines from generations {:?} (resumed at steps {:?}); each of {n} samples once in each of {epochs} epochs",
        lines.len(),
        resumed_at.keys().collect::<Vec<_>>(),
        resumed_at.values().collect::<Vec<_>>()
    );
}

/// The lines of `stream`, printed and sent through a channel by a thread.
pub fn stream_lines(
    stream: impl std::io::Read + Send + 'static,
) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stream)).map_while(Result::ok) {
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Process ids whose command line has every one of `parts`.
pub fn pids_with(parts: &[&str]) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            parts
                .iter()
                .all(|p| args.iter().any(|a| a.contains(p)))
                .then_some(pid)
        })
        .collect()
}

pub mod cluster;

/// `GET path` from `addr` over plain HTTP/1.0: the status code and the body (None when the
/// server cannot be reached).
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, body.to_owned()))
}

/// `s` percent-encoded for a URL's query (every byte but unreserved ones).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A program on the PATH, or None (the tests that need it then skip, saying why).
pub fn program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Two consecutive free ports on 127.0.0.1 (for two workers' `/metrics`).
pub fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
}
