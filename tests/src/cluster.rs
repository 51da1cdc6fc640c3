//! A virtual cluster for the end-to-end tests: the coordinator and every worker on a host of
//! its own (a Linux network namespace with its own address on a bridge), made and removed by
//! `scripts/virtual-cluster.sh`, so that processes talk over a real network path, not
//! 127.0.0.1. The test process itself sits on the bridge too (`.254`), like an operator's
//! machine on the cluster network. Each cluster has its own names and subnet, so tests can run
//! at the same time.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

/// Hosts `c` (the coordinator) and `w0`..`w<n-1>`; removed on drop.
#[derive(Debug)]
pub struct VirtualCluster {
    name: String,
    subnet: String,
    workers: usize,
}

fn script() -> PathBuf {
    crate::repo_root().join("scripts/virtual-cluster.sh")
}

impl VirtualCluster {
    /// A cluster of `workers` worker hosts and a coordinator host, or `None` (with the reason
    /// printed) where network namespaces cannot be made: the test then skips.
    pub fn up(workers: usize) -> Option<Self> {
        let n = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let cluster = Self {
            name: format!("x{}{n}", pid % 100_000),
            subnet: format!("10.{}.{}", 100 + pid % 100, n % 250),
            workers,
        };
        let out = Command::new(script())
            .args(["up", &workers.to_string(), &cluster.name, &cluster.subnet])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                println!(
                    "virtual cluster {}: coordinator {}, workers {}..",
                    cluster.name,
                    cluster.coordinator_ip(),
                    cluster.worker_ip(0)
                );
                Some(cluster)
            }
            Ok(o) => {
                println!(
                    "skipped: network namespaces are not available here (run the tests as root \
                     with iproute2): {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("skipped: cannot run scripts/virtual-cluster.sh: {e}");
                None
            }
        }
    }

    pub fn coordinator_ip(&self) -> String {
        format!("{}.1", self.subnet)
    }

    pub fn worker_ip(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 10 + i)
    }

    pub fn workers(&self) -> usize {
        self.workers
    }

    /// `program` to run on `host` ("c" or "w<i>").
    pub fn command(&self, host: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}-{host}", self.name)])
            .arg(program);
        cmd
    }

    fn script(&self, args: &[&str]) {
        let mut all: Vec<&str> = args.to_vec();
        all.push(&self.name);
        let out = Command::new(script())
            .args(&all)
            .output()
            .expect("virtual-cluster.sh");
        assert!(
            out.status.success(),
            "virtual-cluster.sh {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Pulls `host`'s cable: nothing reaches it or leaves it until [`Self::restore`].
    pub fn cut(&self, host: &str) {
        self.script(&["cut", host]);
    }

    pub fn restore(&self, host: &str) {
        self.script(&["restore", host]);
    }

    /// Shapes `host`'s link to `rate` (tc tbf, e.g. "100mbit") both ways.
    pub fn limit(&self, host: &str, rate: &str) {
        self.script(&["limit", host, rate]);
    }
}

impl Drop for VirtualCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["down", &self.name]).output();
    }
}
