//! Checkpoints on storage that misbehaves, on real file systems: a size-limited tmpfs that fills
//! up at a checkpoint, a commit slower than the vote's deadline, state files that cannot be
//! read. Whatever happens, what was committed stays whole and the job ends as an uninterrupted
//! run of it ends.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use axial_e2e::{assert_each_sample_once, bin, run};
use axial_worker::train::checkpoint::{list, verify};

/// Two workers, 2 epochs of 200 samples in steps of 16 (13 per epoch), a checkpoint every 5
/// steps, the last 2 kept.
fn job(ckpt: &Path) -> String {
    job_every(ckpt, 5)
}

/// [`job`] with a checkpoint every `every` steps.
fn job_every(ckpt: &Path, every: u64) -> String {
    format!(
        r#"
[model]
variant = "official"
layers = [1, 1, 1, 1]
width = 0.125
num_classes = 10
[data]
format = "builtin"
train = 200
val = 32
image_size = 32
loader_threads = 1
log_samples = true
[train]
epochs = 2
batch_size = 8
seed = 11
threads = 1
log_every = 4
[checkpoint]
dir = "{}"
every_steps = {every}
keep = 2
[metrics]
listen = ""
"#,
        ckpt.display()
    )
}

fn launch(dir: &Path, ckpt: &Path, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    launch_job(dir, &job(ckpt), extra, env)
}

fn launch_job(dir: &Path, job: &str, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::fs::write(dir.join("job.toml"), job).expect("write");
    run(Command::new(bin("axial-coordinator"))
        .args(["launch", "--workers", "2"])
        .arg("--worker-bin")
        .arg(bin("axial-worker"))
        .arg(dir.join("job.toml"))
        .args(extra)
        .envs(env.iter().copied()))
}

fn fingerprint(ckpt: &Path) -> String {
    let a = std::fs::read_to_string(ckpt.join("replica-0.sha256")).expect("rank 0 fingerprint");
    let b = std::fs::read_to_string(ckpt.join("replica-1.sha256")).expect("rank 1 fingerprint");
    assert_eq!(a, b, "replicas differ");
    a
}

/// The fingerprint of the job run without a fault (once per test process).
fn uninterrupted() -> String {
    static DONE: OnceLock<Mutex<Option<String>>> = OnceLock::new();
    let slot = DONE.get_or_init(|| Mutex::new(None));
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(f) = slot.as_ref() {
        return f.clone();
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let ckpt = tmp.path().join("ckpt");
    let out = launch(tmp.path(), &ckpt, &[], &[]);
    assert!(out.status.success(), "the uninterrupted run failed");
    let f = fingerprint(&ckpt);
    *slot = Some(f.clone());
    f
}

/// A tmpfs of `mb` MiB mounted on a fresh folder, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mb: u64) -> Result<Self, String> {
        let parent = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = parent.path().join("ckpt");
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed (root and mount rights are needed): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            dir,
            _parent: parent,
        })
    }

    fn resize(&self, mb: u64) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={mb}m")])
            .arg(&self.dir)
            .output()
            .expect("mount");
        assert!(out.status.success(), "remount: {out:?}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// The bytes the job's checkpoint folder holds once it has two checkpoints (measured on a
/// plain folder, so the tmpfs can be sized to fill up at the third).
fn bytes_of(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.filter_map(Result::ok).map(|e| bytes_of(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.len()
    }
}

/// The checkpoint folder on a tmpfs too small for a second checkpoint: the job stops with an
/// error that names the folder and the lack of space; the last committed checkpoint is whole;
/// once the tmpfs is enlarged, `launch --resume` ends the job exactly as an uninterrupted run
/// ends it.
#[test]
fn a_full_disk_stops_the_job_clearly_and_it_resumes_once_space_returns() {
    let expected = uninterrupted();
    // One checkpoint's size, from a run's last one.
    let probe = tempfile::tempdir().expect("tempdir");
    let ckpt = probe.path().join("ckpt");
    let out = launch(probe.path(), &ckpt, &[], &[]);
    assert!(out.status.success());
    let one = bytes_of(&ckpt.join("ckpt-0000000026"));
    assert!(one > 100_000, "a checkpoint of {one} bytes");
    // One committed checkpoint fits, the second's staging folder does not.
    let mb = (one + one / 2).div_ceil(1 << 20).max(1);
    let fs = match Tmpfs::mount(mb) {
        Ok(fs) => fs,
        Err(why) => {
            println!("SKIPPED: {why}");
            return;
        }
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = launch(tmp.path(), &fs.dir, &[], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the job went on on a full disk");
    let named = stderr
        .lines()
        .filter(|l| {
            l.contains("No space left on device") && l.contains(&fs.dir.display().to_string())
        })
        .count();
    println!(
        "tmpfs of {mb} MiB for checkpoints of {one} bytes; {named} error line(s) naming the folder and the space"
    );
    assert!(
        named > 0,
        "no error names the folder and the space:\n{stderr}"
    );
    let committed = list(&fs.dir);
    let last = committed
        .first()
        .expect("the last good checkpoint is there");
    for folder in &committed {
        verify(folder).unwrap_or_else(|e| panic!("{} was damaged: {e}", folder.display()));
    }
    println!("last committed before the disk filled: {}", last.display());
    fs.resize(8 * mb);
    let out = launch(tmp.path(), &fs.dir, &["--resume"], &[]);
    assert!(out.status.success(), "the resumed job failed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("resuming from"));
    assert_eq!(
        fingerprint(&fs.dir),
        expected,
        "the resumed run ended elsewhere"
    );
    assert_each_sample_once(fs._parent.path(), 2, 200);
}

/// Every commit's writer takes longer than rank 0's vote deadline (as on a stalled shared file
/// system): the votes time out, yet every commit lands whole, the group re-forms from it, and
/// the job ends exactly as an uninterrupted run ends.
#[test]
fn commits_slower_than_the_vote_deadline_still_land_whole() {
    let expected = uninterrupted();
    let tmp = tempfile::tempdir().expect("tempdir");
    let ckpt = tmp.path().join("ckpt");
    // Two checkpoints (steps 13 and 26), each commit 11 s against the vote's 10 s deadline.
    let out = launch_job(
        tmp.path(),
        &job_every(&ckpt, 13),
        &[],
        &[("AXIAL_TEST_COMMIT_DELAY_MS", "11000")],
    );
    assert!(out.status.success(), "the job failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let timed_out = stderr
        .lines()
        .filter(|l| l.contains("ended:") && l.contains("Timeout expired"))
        .count();
    println!("{timed_out} vote(s) timed out while their commit was written");
    assert!(timed_out >= 1, "no vote ran past its deadline:\n{stderr}");
    assert_eq!(fingerprint(&ckpt), expected);
    assert_each_sample_once(tmp.path(), 2, 200);
    let committed = list(&ckpt);
    assert!(!committed.is_empty());
    for folder in &committed {
        verify(folder).unwrap_or_else(|e| panic!("{} is not whole: {e}", folder.display()));
    }
}

/// A token file that exists but cannot be read stops `serve` with a clear error; it is not
/// replaced by a new token (the workers hold the old one).
#[test]
fn an_unreadable_token_file_is_an_error() {
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("job.toml"), job(&tmp.path().join("ckpt"))).expect("write");
    let token = tmp.path().join("token");
    std::fs::create_dir(&token).expect("a folder where the file should be");
    let out = run(Command::new(bin("axial-coordinator"))
        .args(["serve", "--listen", "127.0.0.1:0", "--workers", "1"])
        .arg("--token-file")
        .arg(&token)
        .arg(tmp.path().join("job.toml")));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot read the job token file"),
        "{stderr}"
    );
    assert!(token.is_dir(), "left as it was");
}
