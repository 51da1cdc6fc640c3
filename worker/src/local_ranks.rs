//! `axial-worker join --local-ranks N`: one worker process per GPU of a machine (a pod or a
//! node with N GPUs), each a rank of its own on its own `cuda:i`, as torchrun's
//! `--nproc-per-node` does. The parent only supervises: it starts the N `join` processes with
//! the same arguments plus, for child i, `--worker-id <id>-<i>`, `--device cuda:<i>` (unless
//! `--device` names the CPU) and `--metrics-listen <host>:<port + i>`; it forwards SIGTERM and
//! SIGINT to them (each then checkpoints with its group and leaves) and exits with the first
//! failure's status, or 0 when all finished.

use std::ffi::OsString;
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::join::{JoinArgs, Terminated};

/// Flags the parent sets per child (and so drops from its own command line).
const PER_CHILD: [&str; 4] = [
    "--local-ranks",
    "--worker-id",
    "--device",
    "--metrics-listen",
];

/// The command line of child `i` of `n` from the parent's `args` (after `join`).
pub fn child_args(parent: &[OsString], args: &JoinArgs, i: usize) -> anyhow::Result<Vec<OsString>> {
    let mut out: Vec<OsString> = Vec::new();
    let mut skip_value = false;
    for a in parent {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        if PER_CHILD.contains(&s.as_ref()) {
            skip_value = true;
            continue;
        }
        if PER_CHILD.iter().any(|f| s.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a.clone());
    }
    let base = args.worker_id.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "worker".into())
    });
    out.push("--worker-id".into());
    out.push(format!("{base}-{i}").into());
    let device = match args.device.as_deref() {
        Some("cpu") => "cpu".to_owned(),
        Some(d) if d != "cuda" => bail!(
            "--local-ranks gives each rank its own cuda:N; --device {d} cannot be shared (use cuda or cpu)"
        ),
        _ => format!("cuda:{i}"),
    };
    out.push("--device".into());
    out.push(device.into());
    if let Some(m) = &args.metrics_listen {
        out.push("--metrics-listen".into());
        if m.is_empty() {
            out.push("".into());
        } else {
            let addr: std::net::SocketAddr = m
                .parse()
                .with_context(|| format!("--metrics-listen {m:?} is not host:port"))?;
            let port = if addr.port() == 0 {
                0
            } else {
                u16::try_from(usize::from(addr.port()) + i)
                    .map_err(|_| anyhow::anyhow!("--metrics-listen {m} + {i} passes 65535"))?
            };
            out.push(
                std::net::SocketAddr::new(addr.ip(), port)
                    .to_string()
                    .into(),
            );
        }
    }
    Ok(out)
}

/// Runs `n` local ranks and waits for them (see the module's documentation).
pub fn run(args: &JoinArgs, n: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("the worker binary's path")?;
    let all: Vec<OsString> = std::env::args_os().skip(1).collect();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("a signal handler")?;
    }
    let mut children: Vec<(usize, Child)> = Vec::new();
    for i in 0..n {
        let child_args = child_args(&all, args, i)?;
        let child = Command::new(&exe)
            .args(&child_args)
            .spawn()
            .with_context(|| format!("start local rank {i}"))?;
        children.push((i, child));
    }
    eprintln!("local ranks: {n} worker processes, one per device");
    let mut forwarded = false;
    let mut first_failure: Option<(usize, ExitStatus)> = None;
    while !children.is_empty() {
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            for (_, c) in &children {
                signal(c, libc::SIGTERM);
            }
        }
        let mut k = 0;
        while k < children.len() {
            if let Some(status) = children[k].1.try_wait()? {
                let (i, _) = children.remove(k);
                if !status.success() && first_failure.is_none() {
                    eprintln!("local ranks: rank process {i} exited with {status}");
                    first_failure = Some((i, status));
                }
            } else {
                k += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    match first_failure {
        None => Ok(()),
        Some((_, status)) if status.code() == Some(143) => Err(Terminated(
            "terminated (SIGTERM): the local ranks checkpointed with their group and left".into(),
        )
        .into()),
        Some((i, status)) => bail!("local rank {i} exited with {status}"),
    }
}

#[allow(unsafe_code)]
fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        join: JoinArgs,
    }

    fn parse(line: &[&str]) -> (Vec<OsString>, JoinArgs) {
        let all: Vec<OsString> = line.iter().map(OsString::from).collect();
        let cli = Cli::parse_from(std::iter::once("join").chain(line.iter().copied()));
        (all, cli.join)
    }

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    /// Each child gets its own id, device and metrics port; the rest is passed on as given.
    #[test]
    fn each_local_rank_gets_its_own_id_device_and_port() {
        let (all, args) = parse(&[
            "--coordinator",
            "http://c:50051",
            "--token-file",
            "/t",
            "--local-ranks",
            "4",
            "--worker-id=pod-3",
            "--metrics-listen",
            "0.0.0.0:9401",
        ]);
        let c = strings(&child_args(&all, &args, 2).expect("args"));
        assert_eq!(
            c,
            [
                "--coordinator",
                "http://c:50051",
                "--token-file",
                "/t",
                "--worker-id",
                "pod-3-2",
                "--device",
                "cuda:2",
                "--metrics-listen",
                "0.0.0.0:9403"
            ]
        );
        let (all, args) = parse(&[
            "--coordinator",
            "http://c:50051",
            "--token-file",
            "/t",
            "--device",
            "cpu",
            "--worker-id",
            "w",
        ]);
        let c = strings(&child_args(&all, &args, 1).expect("args"));
        assert!(c.ends_with(&[
            "--worker-id".into(),
            "w-1".into(),
            "--device".into(),
            "cpu".into()
        ]));
        let (all, args) = parse(&[
            "--coordinator",
            "http://c:50051",
            "--token-file",
            "/t",
            "--device",
            "cuda:1",
        ]);
        let err = child_args(&all, &args, 0).expect_err("a fixed GPU cannot be shared");
        assert!(err.to_string().contains("cuda:1"), "{err}");
    }
}
