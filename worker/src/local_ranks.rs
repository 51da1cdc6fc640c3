//! `axial-worker join --local-ranks N`: one worker process per GPU of a machine (a pod or a
//! node with N GPUs), each a rank of its own on its own `cuda:i`, as torchrun's
//! `--nproc-per-node` does. The parent only supervises: it starts the N `join` processes with
//! the same arguments plus, for child i, `--worker-id <id>-<i>`, `--device cuda:<i>` (unless
//! `--device` names the CPU) and `--metrics-listen <host>:<port + i>`, and forwards SIGTERM and
//! SIGINT to them (each then checkpoints with its group and leaves).
//!
//! Supervision, as torchrun's elastic agent: a child that crashes (exits non-zero unasked) or
//! hangs (sends no liveness byte on its pipe for `--hang-timeout` seconds: stopped, or every
//! thread stuck) is killed and started again under the same id, after 1, 2, 4 ... seconds, up
//! to `--max-restarts` times in all; past that, the parent stops the other children (SIGTERM,
//! then SIGKILL after a grace period) and exits non-zero naming the rank, so that the scheduler
//! restarts the pod (Kubernetes) or the task (Slurm). A survivor never waits alone for a dead
//! sibling. Children die with the parent (a parent-death signal). Each child gets
//! `OMP_NUM_THREADS` = its share of the CPUs and its own slice of them (CPU affinity), unless
//! `OMP_NUM_THREADS` is set or `AXIAL_CPU_AFFINITY=none`.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::join::{JoinArgs, Terminated};

/// Flags the parent sets per child or keeps for itself (and so drops from the children's
/// command lines).
const PER_CHILD: [&str; 6] = [
    "--local-ranks",
    "--worker-id",
    "--device",
    "--metrics-listen",
    "--max-restarts",
    "--hang-timeout",
];

/// The environment variable that hands a child the write end of its liveness pipe.
const LIVENESS_FD: &str = "AXIAL_LIVENESS_FD";
/// How often a child writes its liveness byte.
const LIVENESS_EVERY: Duration = Duration::from_millis(500);
/// How long stopped children get to leave before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(30);

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

/// In a local rank (started by [`run`]): a thread that writes a byte to the parent's
/// liveness pipe every half second, for as long as the process runs.
#[allow(unsafe_code)]
pub fn report_liveness() {
    let Some(fd) = std::env::var(LIVENESS_FD)
        .ok()
        .and_then(|v| v.parse::<libc::c_int>().ok())
    else {
        return;
    };
    let _ = std::thread::Builder::new()
        .name("liveness-pipe".into())
        .spawn(move || {
            loop {
                // SAFETY: write(2) of one byte from a local buffer to the inherited pipe.
                let n = unsafe { libc::write(fd, [1u8].as_ptr().cast(), 1) };
                if n < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EPIPE) {
                    return; // the parent is gone
                }
                std::thread::sleep(LIVENESS_EVERY);
            }
        });
}

/// One supervised child.
struct Rank {
    index: usize,
    child: Option<Child>,
    /// The read end of its liveness pipe (non-blocking), and when it last said something.
    pipe: libc::c_int,
    heard: Instant,
    restarts: u32,
    /// When to start it again (after a failure's back-off).
    restart_at: Option<Instant>,
}

/// The CPUs this process may run on.
#[allow(unsafe_code)]
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the zeroed set it is given.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Starts child `i` with its liveness pipe, its CPU share and a parent-death signal; returns
/// it and the pipe's read end.
#[allow(unsafe_code)]
fn spawn(
    exe: &std::path::Path,
    args: &[OsString],
    i: usize,
    n: usize,
    cpus: &[usize],
) -> anyhow::Result<(Child, libc::c_int)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two descriptors; both close on exec (the child's end is kept
    // open across its own exec below).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(std::io::Error::last_os_error()).context("a liveness pipe");
    }
    let (read, write) = (fds[0], fds[1]);
    let mut cmd = Command::new(exe);
    cmd.args(args).env(LIVENESS_FD, write.to_string());
    let share = (cpus.len() / n).max(1);
    if std::env::var_os("OMP_NUM_THREADS").is_none() {
        cmd.env("OMP_NUM_THREADS", share.to_string());
    }
    let slice: Vec<usize> =
        if cpus.len() >= n && std::env::var("AXIAL_CPU_AFFINITY").as_deref() != Ok("none") {
            cpus.iter().copied().skip(i * share).take(share).collect()
        } else {
            Vec::new()
        };
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe calls between fork and exec (fcntl, prctl, getppid,
    // sched_setaffinity, _exit) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            // The pipe's write end stays open in this child only.
            if libc::fcntl(write, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The child dies with the parent, even a parent killed by SIGKILL.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            if !slice.is_empty() {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &c in &slice {
                    libc::CPU_SET(c, &mut set);
                }
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    // SAFETY: the parent's copy of the write end is not needed (the child has its own).
    unsafe {
        libc::close(write);
    }
    match child {
        Ok(c) => Ok((c, read)),
        Err(e) => {
            // SAFETY: the read end is ours and unused.
            unsafe {
                libc::close(read);
            }
            Err(e).with_context(|| format!("start local rank {i}"))
        }
    }
}

/// Reads what a child has written to its pipe; whether it said anything.
#[allow(unsafe_code)]
fn drain(pipe: libc::c_int) -> bool {
    let mut buf = [0u8; 64];
    let mut heard = false;
    loop {
        // SAFETY: read(2) into a local buffer of its length, from our non-blocking pipe end.
        let got = unsafe { libc::read(pipe, buf.as_mut_ptr().cast(), buf.len()) };
        if got <= 0 {
            return heard;
        }
        heard = true;
    }
}

/// Runs `n` local ranks and supervises them (see the module's documentation).
#[allow(unsafe_code)]
pub fn run(args: &JoinArgs, n: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("the worker binary's path")?;
    let all: Vec<OsString> = std::env::args_os().skip(1).collect();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone()).context("a signal handler")?;
    }
    let cpus = allowed_cpus();
    let hang = Duration::from_secs(args.hang_timeout.max(1));
    let mut ranks = Vec::with_capacity(n);
    let mut child_args_of = Vec::with_capacity(n);
    for i in 0..n {
        let a = child_args(&all, args, i)?;
        let (child, pipe) = spawn(&exe, &a, i, n, &cpus)?;
        child_args_of.push(a);
        ranks.push(Rank {
            index: i,
            child: Some(child),
            pipe,
            heard: Instant::now(),
            restarts: 0,
            restart_at: None,
        });
    }
    eprintln!(
        "local ranks: {n} worker processes, one per device (restarted up to {} times, a silent one killed after {} s)",
        args.max_restarts, args.hang_timeout
    );
    let mut forwarded = false;
    let mut failure: Option<(usize, String)> = None;
    let mut terminated = false;
    let result = loop {
        if stop.load(Ordering::Relaxed) && !forwarded {
            forwarded = true;
            for r in &ranks {
                if let Some(c) = &r.child {
                    signal(c, libc::SIGTERM);
                }
            }
        }
        for r in &mut ranks {
            if drain(r.pipe) {
                r.heard = Instant::now();
            }
            let Some(child) = r.child.as_mut() else {
                continue;
            };
            let why = match child.try_wait()? {
                Some(status) if status.success() => {
                    r.child = None;
                    continue;
                }
                Some(status) if forwarded => {
                    terminated |= status.code() == Some(143);
                    r.child = None;
                    if status.code() != Some(143) && failure.is_none() {
                        failure = Some((r.index, format!("exited with {status}")));
                    }
                    continue;
                }
                Some(status) => format!("exited with {status}"),
                None if r.heard.elapsed() > hang => {
                    signal(child, libc::SIGKILL);
                    let _ = child.wait();
                    format!(
                        "was silent for {} s (hung or stopped); killed",
                        hang.as_secs()
                    )
                }
                None => continue,
            };
            r.child = None;
            if r.restarts < args.max_restarts {
                let wait = Duration::from_secs(1 << r.restarts.min(5));
                r.restarts += 1;
                eprintln!(
                    "local ranks: rank process {} {why}; starting it again in {} s ({} of {})",
                    r.index,
                    wait.as_secs(),
                    r.restarts,
                    args.max_restarts
                );
                r.restart_at = Some(Instant::now() + wait);
            } else {
                eprintln!(
                    "local ranks: rank process {} {why}, and it was started again {} times already: stopping the others",
                    r.index, r.restarts
                );
                failure.get_or_insert((r.index, why));
            }
        }
        if failure.is_some() && !forwarded {
            // Past its restarts: the node's processes end together (the scheduler restarts it).
            forwarded = true;
            let deadline = Instant::now() + STOP_GRACE;
            for r in &ranks {
                if let Some(c) = &r.child {
                    signal(c, libc::SIGTERM);
                }
            }
            for r in &mut ranks {
                if let Some(c) = r.child.as_mut() {
                    while c.try_wait()?.is_none() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if c.try_wait()?.is_none() {
                        signal(c, libc::SIGKILL);
                        let _ = c.wait();
                    }
                }
                r.child = None;
                r.restart_at = None;
            }
        }
        for r in &mut ranks {
            if r.restart_at.is_some_and(|t| Instant::now() >= t) && !forwarded {
                r.restart_at = None;
                // SAFETY: the old pipe's read end is ours; its writer is gone.
                unsafe {
                    libc::close(r.pipe);
                }
                let (child, pipe) = spawn(&exe, &child_args_of[r.index], r.index, n, &cpus)?;
                r.child = Some(child);
                r.pipe = pipe;
                r.heard = Instant::now();
            }
        }
        let running = ranks
            .iter()
            .any(|r| r.child.is_some() || (r.restart_at.is_some() && !forwarded));
        if !running {
            break match failure {
                Some((i, why)) => Err(anyhow::anyhow!("local rank {i} {why}")),
                None if terminated => Err(Terminated(
                    "terminated (SIGTERM): the local ranks checkpointed with their group and left"
                        .into(),
                )
                .into()),
                None => Ok(()),
            };
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for r in &ranks {
        // SAFETY: our pipe ends, closed once.
        unsafe {
            libc::close(r.pipe);
        }
    }
    result
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
