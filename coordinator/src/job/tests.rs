use super::*;

fn job(dir: &std::path::Path) -> JobConfig {
    let text = format!(
        "[model]\narch = \"axial26s\"\nnum_classes = 10\n[data]\nformat = \"builtin\"\ntrain = 100\nval = 10\nimage_size = 32\n[checkpoint]\ndir = \"{}\"\n",
        dir.display()
    );
    JobConfig::parse(&text, "test", std::path::Path::new("/")).expect("job")
}

/// A group of exactly one worker, formed at its first join.
fn one_worker(timeout_ms: u64) -> MembershipConfig {
    MembershipConfig {
        min: 1,
        max: 1,
        settle_ms: 0,
        timeout_ms,
    }
}

/// Writes rank 0's files of a checkpoint into `folder` and describes them.
fn checkpoint_files(folder: &std::path::Path) -> Vec<FileEntry> {
    std::fs::create_dir_all(folder).expect("mkdir");
    for name in checkpoint::FILES {
        std::fs::write(folder.join(name), name.as_bytes()).expect("write");
    }
    checkpoint::describe(folder, &checkpoint::FILES).expect("describe")
}

/// A vote may only name its own checkpoint's folder and files (the coordinator writes the
/// manifest there); anything else is refused and logged. Leaves act only on members.
#[test]
fn votes_naming_other_folders_or_files_and_strangers_leaving_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    let g = assignment.generation;
    let pos = Position {
        step: 4,
        consumed: 32,
        samples_seen: 32,
        loss_scale: 1.0,
        ..Position::default()
    };
    let good = tmp.path().join(checkpoint::staging_name(g, 4));
    let files = checkpoint_files(&good);
    let renamed = |name: &str| {
        let mut f = files.clone();
        f[0].name = name.into();
        f
    };
    for (folder, files, why) in [
        (tmp.path().join("elsewhere"), files.clone(), "is not"),
        (std::path::PathBuf::from("/etc"), files.clone(), "is not"),
        (good.clone(), renamed("../../etc/passwd"), "are not"),
        (good.clone(), renamed("/etc/passwd"), "are not"),
        (good.clone(), files[..3].to_vec(), "are not"),
    ] {
        let v = s.vote(Voter::rank(0, g), pos, Some(folder.clone()), files, 5);
        assert!(!v.accepted && v.reason.contains(why), "{folder:?}: {v:?}");
    }
    assert!(s.log.iter().any(|l| l.contains("refused a vote")));
    assert!(!good.join("manifest.json").exists());
    let v = s.vote(Voter::rank(0, g), pos, Some(good.clone()), files, 6);
    assert!(v.committed, "{v:?}");
    // The staging folder became the committed one.
    assert!(!good.exists());
    checkpoint::verify(&tmp.path().join(checkpoint::folder_name(4))).expect("committed");
    // A leave for an id that is no member does nothing; the member is still running.
    s.leave("stranger", true, "", 7);
    s.leave("stranger", false, "go away", 7);
    assert_eq!(s.rank_of("a"), Some(0));
    assert!(!s.done());
    assert!(s.status(8).workers.iter().all(|w| w.id != "stranger"));
}

/// A job of exactly two workers, "a" and "b", formed: the state and b's assignment.
fn two_ranks(dir: &std::path::Path) -> (JobState, crate::membership::Assignment) {
    let members = MembershipConfig {
        min: 2,
        max: 2,
        settle_ms: 100,
        timeout_ms: 10_000,
    };
    let mut s = JobState::new(job(dir), members, false).expect("state");
    s.join("a", 1, None, 0);
    let Join::Assigned { assignment, .. } = s.join("b", 1, None, 0) else {
        panic!("group")
    };
    (s, assignment)
}

/// Generation `g`'s staging folder, file votes and position of a checkpoint at step 12 (96
/// samples in).
fn checkpoint_at_step_12(
    dir: &std::path::Path,
    g: u64,
) -> (std::path::PathBuf, Vec<FileEntry>, Position) {
    let folder = dir.join(checkpoint::staging_name(g, 12));
    let files = checkpoint_files(&folder);
    let pos = Position {
        step: 12,
        consumed: 96,
        samples_seen: 96,
        loss_scale: 1.0,
        ..Position::default()
    };
    (folder, files, pos)
}

/// Two ranks vote; the coordinator commits the manifest, and status and metrics show it.
#[test]
fn votes_commit_and_status_reports() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, assignment) = two_ranks(tmp.path());
    assert_eq!(assignment.world, 2);
    let g = assignment.generation;
    // The rendezvous store: for this generation's ranks only.
    let set = || crate::rendezvous::Op::Set {
        key: "k".into(),
        value: b"v".to_vec(),
    };
    assert!(s.store("a", g, set()).is_ok());
    assert!(matches!(
        s.store("a", g + 7, set()),
        Err(StoreRefused::Stale { .. })
    ));
    assert!(matches!(
        s.store("stranger", g, set()),
        Err(StoreRefused::NotMember { .. })
    ));
    s.record_progress("a", 12, 1.5, 300.0, 10);
    let (folder, files, pos) = checkpoint_at_step_12(tmp.path(), g);
    let ra = s.rank_of("a").expect("rank");
    let rb = s.rank_of("b").expect("rank");
    let first = s.vote(Voter::rank(ra, g), pos, Some(folder.clone()), files, 20);
    assert!(first.accepted && !first.committed);
    assert!(
        !folder.join("manifest.json").exists(),
        "not committed before every rank voted"
    );
    let stale = s.vote(Voter::rank(rb, g + 1), pos, None, Vec::new(), 25);
    assert!(!stale.accepted);
    let last = s.vote(Voter::rank(rb, g), pos, None, Vec::new(), 30);
    assert!(last.committed, "{last:?}");
    let committed = tmp.path().join(checkpoint::folder_name(12));
    let manifest = axial_common::checkpoint::verify(&committed).expect("committed and verified");
    assert_eq!(
        (manifest.step, manifest.world, manifest.position.consumed),
        (12, 2, 96)
    );

    let status = s.status(1030);
    assert_eq!(status.world, 2);
    assert_eq!(status.global_step, 12);
    let committed = status.committed.as_ref().expect("committed");
    assert_eq!((committed.step, committed.age_ms), (12, Some(1000)));
    let text = status.prometheus();
    for needle in [
        "axial_coordinator_workers{state=\"running\"} 2",
        "axial_coordinator_generation",
        "axial_coordinator_committed_step 12",
        "axial_coordinator_checkpoint_age_seconds 1",
        "# HELP axial_coordinator_global_step",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    let json = serde_json::to_string(&status).expect("json");
    assert!(json.contains("\"workers\"") && json.contains("\"events\""));
}

/// Rank 0's vote for its group commits the checkpoint in one call, with no vote from rank 1.
#[test]
fn rank_0_votes_for_its_group_in_one_call() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (mut s, assignment) = two_ranks(tmp.path());
    let g = assignment.generation;
    let (folder, files, pos) = checkpoint_at_step_12(tmp.path(), g);
    let (ra, rb) = (s.rank_of("a").expect("rank"), s.rank_of("b").expect("rank"));
    let (zero, other) = if ra == 0 { (ra, rb) } else { (rb, ra) };
    assert_eq!(zero, 0);
    let refused = s.vote(
        Voter {
            rank: other,
            generation: g,
            for_group: true,
        },
        pos,
        None,
        Vec::new(),
        10,
    );
    assert!(
        !refused.accepted && refused.reason.contains("only rank 0"),
        "{refused:?}"
    );
    let stale = s.vote(
        Voter::group(g + 1),
        pos,
        Some(folder.clone()),
        files.clone(),
        11,
    );
    assert!(
        !stale.accepted && !folder.join("manifest.json").exists(),
        "{stale:?}"
    );
    let v = s.vote(Voter::group(g), pos, Some(folder.clone()), files, 12);
    assert!(v.accepted && v.committed, "{v:?}");
    let committed = tmp.path().join(checkpoint::folder_name(12));
    let manifest = axial_common::checkpoint::verify(&committed).expect("committed and verified");
    assert_eq!((manifest.step, manifest.world), (12, 2));
    assert_eq!(s.status(20).committed.expect("committed").step, 12);
}

/// Hyperparameter changes: the coordinator picks a step every rank reaches only after
/// hearing of the change, refuses earlier ones and bad values, records the changes in the
/// next manifest, and a coordinator restarted on the saved state keeps them, counts the
/// restart and goes on with newer generations.
#[test]
fn changes_are_scheduled_recorded_and_survive_a_restart() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let members = one_worker(10_000);
    let mut s = JobState::new(job(tmp.path()), members, false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    s.record_progress("a", 40, 1.0, 10.0, 5);
    let log_every = s.job.train.log_every;
    let change = s
        .set_hyperparameters(
            HyperParameterChange {
                lr: Some(0.02),
                ..Default::default()
            },
            6,
        )
        .expect("accepted");
    assert_eq!((change.id, change.from_step), (1, 40 + 2 * log_every + 1));
    let soon = s.set_hyperparameters(
        HyperParameterChange {
            weight_decay: Some(0.0),
            from_step: 41,
            ..Default::default()
        },
        7,
    );
    assert!(soon.expect_err("too soon").contains("too soon"));
    let bad = s.set_hyperparameters(
        HyperParameterChange {
            lr: Some(f64::INFINITY),
            ..Default::default()
        },
        7,
    );
    assert!(bad.expect_err("bad lr").contains("lr"));
    // The next checkpoint records the change.
    let folder = tmp
        .path()
        .join(checkpoint::staging_name(assignment.generation, 50));
    let files = checkpoint_files(&folder);
    let pos = Position {
        step: 50,
        consumed: 50,
        samples_seen: 50,
        loss_scale: 1.0,
        ..Position::default()
    };
    let v = s.vote(
        Voter::rank(0, assignment.generation),
        pos,
        Some(folder.clone()),
        files,
        10,
    );
    assert!(v.committed, "{v:?}");
    let m = axial_common::checkpoint::verify(&tmp.path().join(checkpoint::folder_name(50)))
        .expect("manifest");
    assert_eq!(m.changes, vec![change.clone()]);
    let status = s.status(11);
    assert_eq!(status.changes.len(), 1);

    // The coordinator restarts on its saved state.
    let mut again = JobState::new(job(tmp.path()), members, true).expect("state");
    assert_eq!(again.changes(), &[change][..]);
    assert_eq!(again.restarts(), 1);
    assert!(
        again
            .status(0)
            .prometheus()
            .contains("axial_coordinator_restarts_total 1")
    );
    let Join::Assigned {
        assignment: next,
        resume,
        ..
    } = again.join("a", 2, None, 0)
    else {
        panic!("group")
    };
    assert!(next.generation > assignment.generation);
    assert_eq!(resume.expect("resume point").position.step, 50);
}

/// Once a member has left with the job finished, a standby (or a late worker) is told the
/// job is over instead of waiting for a group that will never form.
#[test]
fn after_the_job_finished_joiners_are_told_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let members = one_worker(10_000);
    let mut s = JobState::new(job(tmp.path()), members, false).expect("state");
    assert!(matches!(s.join("a", 1, None, 0), Join::Assigned { .. }));
    assert!(matches!(s.join("standby", 1, None, 1), Join::Wait));
    s.leave("a", true, "", 2);
    assert!(matches!(s.join("standby", 1, None, 3), Join::Finished));
    assert!(s.done(), "the finished job's joiners are not waited for");
    assert!(matches!(s.join("late", 1, None, 4), Join::Finished));
}

/// A commit that fails (here the checkpoint's folder is a file, so the manifest cannot be
/// written, as on a full or read-only disk) is refused, logged and counted, and shows in
/// status and metrics; after a few failures in a row the job stops, saying why.
#[test]
fn failed_commits_are_refused_shown_and_stop_the_job_when_they_persist() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    let g = assignment.generation;
    for (n, step) in [4u64, 8, 12].into_iter().enumerate() {
        let staging = tmp.path().join(checkpoint::staging_name(g, step));
        let files = checkpoint_files(&staging);
        let folder = tmp.path().join(checkpoint::folder_name(step));
        std::fs::write(&folder, b"not a folder").expect("write");
        let pos = Position {
            step,
            loss_scale: 1.0,
            ..Position::default()
        };
        let v = s.vote(Voter::rank(0, g), pos, Some(staging), files, 10 * step);
        assert!(!v.accepted && !v.committed, "{v:?}");
        assert!(v.reason.contains("commit failed"), "{v:?}");
        let status = s.status(10 * step);
        assert_eq!(status.commit_failures, n as u64 + 1);
        assert!(status.commit_error.is_some());
        assert!(status.prometheus().contains(&format!(
            "axial_coordinator_commit_failures_total {}",
            n + 1
        )));
    }
    let why = s.failed().expect("the job stops").to_owned();
    println!("{why}");
    assert!(
        why.contains("3 checkpoint commits failed in a row"),
        "{why}"
    );
    assert_eq!(s.status(200).failed.as_deref(), Some(why.as_str()));
}

/// The job ends only when every member has left, not at the first leave: the others'
/// leaves must still find the coordinator (and `launch` then exits 0).
#[test]
fn the_job_ends_when_the_last_member_has_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let members = MembershipConfig {
        min: 2,
        max: 2,
        settle_ms: 100,
        timeout_ms: 10_000,
    };
    let mut s = JobState::new(job(tmp.path()), members, false).expect("state");
    s.join("a", 1, None, 0);
    assert!(matches!(s.join("b", 1, None, 0), Join::Assigned { .. }));
    s.leave("a", true, "", 10);
    assert!(!s.done(), "b has not left yet");
    s.leave("b", true, "", 20);
    assert!(s.done());
    // A member that never leaves is dropped after the heartbeat timeout.
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = JobState::new(job(tmp.path()), members, false).expect("state");
    s.join("a", 1, None, 0);
    s.join("b", 1, None, 0);
    s.leave("a", true, "", 10);
    s.tick(5_000);
    assert!(!s.done());
    s.tick(20_000);
    assert!(s.done());
}

/// With a progress timeout, a running group whose step stops advancing (while every member
/// still heartbeats) is ended; without one it is left alone.
#[test]
fn a_stalled_group_is_ended_after_the_progress_timeout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let members = one_worker(60_000);
    let mut s = JobState::new(job(tmp.path()), members, false).expect("state");
    s.set_progress_timeout(1000);
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    s.tick(10);
    for (t, step) in [(500, 5), (1400, 9), (2300, 12)] {
        s.record_progress("a", step, 1.0, 1.0, t);
        s.tick(t);
    }
    assert_eq!(s.generation(), assignment.generation, "it advances");
    s.heartbeat("a", assignment.generation, 3200);
    s.tick(3200);
    assert_eq!(
        s.generation(),
        assignment.generation,
        "stalled for 0.9 s only"
    );
    s.tick(3400);
    assert!(s.generation() > assignment.generation, "stalled for 1.1 s");
    assert!(
        s.log.iter().any(|l| l.contains("no progress past step 12")),
        "{:?}",
        s.log
    );
    // The group re-forms and resumes from a commit at step 5: steps 6, 7, 8 are progress
    // although they are below the 12 reported before the rollback.
    let Join::Assigned {
        assignment: again, ..
    } = s.join("a", 1, None, 3500)
    else {
        panic!("group again")
    };
    s.tick(3500);
    for (t, step) in [(4000, 6), (4900, 7), (5800, 8)] {
        s.heartbeat("a", again.generation, t);
        s.record_progress("a", step, 1.0, 1.0, t);
        s.tick(t);
    }
    assert_eq!(
        s.generation(),
        again.generation,
        "progress after the rollback"
    );
    let mut off = JobState::new(job(tmp.path()), members, false).expect("state");
    off.join("a", 1, None, 0);
    off.tick(10);
    off.tick(1_000_000);
    assert!(off.log.iter().all(|l| !l.contains("no progress")));
}

/// A damaged `coordinator.json` is kept aside byte for byte, not overwritten, and the new
/// coordinator's generations start above any the old one can have used.
#[test]
fn a_damaged_state_file_is_kept_and_generations_stay_new() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let j = job(tmp.path());
    std::fs::write(state_file(&j), b"{ not json").expect("write");
    let mut s = JobState::new(j.clone(), one_worker(10_000), true).expect("state");
    let aside = tmp.path().join("coordinator.json.damaged");
    assert_eq!(std::fs::read(&aside).expect("kept aside"), b"{ not json");
    assert!(
        s.log.iter().any(|l| l.contains("is damaged")),
        "{:?}",
        s.log
    );
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    assert!(
        assignment.generation > 1_000_000_000,
        "{}",
        assignment.generation
    );
    // The fresh state file is valid again.
    let again = JobState::new(j, one_worker(10_000), true).expect("state");
    assert_eq!(again.restarts(), 1);
}

/// A member terminating right after a re-formation, before any rank of the new group has
/// reported: the drain step lies past the committed step the group resumed from (it was
/// computed from the reports alone, which the re-formation cleared, so the group never reached
/// it).
#[test]
fn a_drain_right_after_a_resume_lies_past_the_committed_step() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    let folder = tmp
        .path()
        .join(checkpoint::staging_name(assignment.generation, 40));
    let files = checkpoint_files(&folder);
    let pos = Position {
        step: 40,
        consumed: 320,
        samples_seen: 320,
        loss_scale: 1.0,
        ..Position::default()
    };
    s.record_progress("a", 40, 1.0, 100.0, 5);
    let v = s.vote(
        Voter::rank(0, assignment.generation),
        pos,
        Some(folder),
        files,
        6,
    );
    assert!(v.committed, "{v:?}");
    // The worker restarts: a new generation, resuming from step 40, no report yet.
    let Join::Assigned { resume, .. } = s.join("a", 2, None, 10) else {
        panic!("re-formed")
    };
    assert_eq!(resume.map(|c| c.position.step), Some(40));
    let log_every = s.job.train.log_every;
    assert_eq!(s.terminating("a"), Some(40 + 2 * log_every + 1));
}

/// Splits by speed keep the total, stay in [1, max] and follow the speeds.
#[test]
fn split_by_speed_keeps_the_global_batch_within_the_bounds() {
    assert_eq!(split_by_speed(&[1.0, 1.0], 32, 32), [16, 16]);
    assert_eq!(split_by_speed(&[2.0, 1.0], 48, 48), [32, 16]);
    // Capped at max: the fast rank gets 2x at most, the rest goes to the others.
    assert_eq!(split_by_speed(&[10.0, 1.0, 1.0], 48, 32), [32, 8, 8]);
    // Never below one sample.
    assert_eq!(split_by_speed(&[1000.0, 1.0], 16, 15), [15, 1]);
    for speeds in [
        [3.0, 1.0, 1.0, 0.5],
        [1.0, 1.1, 0.9, 1.0],
        [7.0, 7.0, 7.0, 1e-6],
    ] {
        let s = split_by_speed(&speeds, 4 * 25, 50);
        assert_eq!(s.iter().sum::<u64>(), 100, "{speeds:?}: {s:?}");
        assert!(
            s.iter().all(|&n| (1..=50).contains(&n)),
            "{speeds:?}: {s:?}"
        );
    }
}

/// `[train] rebalance`: once both ranks have reported a window under the even split, the
/// coordinator splits the batch by their speeds (own work without the waits), for a step both
/// hear of first; status and metrics name the straggler; a new generation starts even.
#[test]
fn a_straggler_gets_a_smaller_share_of_the_batch() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut config = job(tmp.path());
    config.train.batch_size = 16;
    config.train.log_every = 5;
    config.train.rebalance = true;
    config.train.sync_bn = axial_common::job::SyncBn::All;
    let members = MembershipConfig {
        min: 2,
        max: 2,
        settle_ms: 0,
        timeout_ms: 60_000,
    };
    let mut s = JobState::new(config, members, false).expect("state");
    s.join("fast", 1, None, 0);
    let Join::Assigned { assignment, .. } = s.join("slow", 1, None, 0) else {
        panic!("group")
    };
    let g = assignment.generation;
    let (fast, slow) = (
        s.rank_of("fast").expect("rank"),
        s.rank_of("slow").expect("rank"),
    );
    // Both steps take 0.3 s: the fast rank works 0.1 s and waits 0.2 s; the slow one works
    // 0.3 s (data_wait, forward, backward, allreduce_wait, optimizer, sync_wait).
    let report = |step: u64, work: f64, wait: f64| Report {
        step,
        phase_seconds: [
            0.0,
            work * 0.4,
            work * 0.5,
            wait * 0.5,
            work * 0.1,
            wait * 0.5,
        ],
        ..Report::default()
    };
    let mut at = 0;
    for step in (5..=20).step_by(5) {
        at += 1000;
        s.record_report("fast", report(step, 0.1, 0.2), at);
        s.record_report("slow", report(step, 0.3, 0.0), at);
        if step < 15 {
            assert_eq!(s.shares_for(g), None, "step {step}: not measured yet");
        }
    }
    let shares = s.shares_for(g).expect("rebalanced").clone();
    let mut by_rank = [0u64; 2];
    by_rank[fast] = 24;
    by_rank[slow] = 8;
    assert_eq!(shares.samples, by_rank);
    // Scheduled past where any rank can be before hearing of it.
    assert!(shares.from_step > 20 + 5, "{shares:?}");
    assert!(s.log.iter().any(|l| l.contains("the batch split by speed")));
    let status = s.status(at);
    assert_eq!(status.ranks[0].id, "slow");
    assert!((status.straggler_ratio.expect("ratio") - 3.0).abs() < 1e-9);
    assert_eq!(status.batch_shares.as_ref(), Some(&shares));
    let text = status.prometheus();
    for needle in [
        "axial_coordinator_straggler_ratio 3",
        &format!("axial_coordinator_slowest_rank {slow}"),
        "axial_coordinator_batch_share_max_ratio 1.5",
        "axial_coordinator_batch_share_min_ratio 0.5",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
    // No new split until both have reported a window under this one.
    s.record_report("slow", report(shares.from_step + 5, 0.1, 0.0), at + 100);
    assert_eq!(s.shares_for(g), Some(&shares));
    // A new generation (the fast worker restarted) starts from the even split.
    s.join("fast", 2, None, at + 200);
    s.join("slow", 1, None, at + 200);
    s.join("fast", 2, None, at + 200);
    assert_ne!(s.generation(), g);
    assert_eq!(s.world(), 2);
    assert_eq!(s.shares_for(s.generation()), None);
    assert_eq!(s.current_shares(), vec![16; s.world()]);
}

/// A commit in flight decides the resume point: no group forms while it is written (a worker
/// that re-joins waits), a vote for the same or an earlier step is refused meanwhile and after,
/// and the group formed after it resumes from it.
#[test]
fn a_commit_in_flight_holds_formation_and_later_votes_at_or_below_it_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    let g = assignment.generation;
    let staging = tmp.path().join(checkpoint::staging_name(g, 8));
    let files = checkpoint_files(&staging);
    let pos = Position {
        step: 8,
        consumed: 64,
        samples_seen: 64,
        loss_scale: 1.0,
        ..Position::default()
    };
    let Cast::Commit(c) = s.cast_vote(
        Voter::rank(0, g),
        pos,
        Some(staging.clone()),
        files.clone(),
        5,
    ) else {
        panic!("the last vote makes a commit")
    };
    let again = s.vote(
        Voter::rank(0, g),
        pos,
        Some(staging.clone()),
        files.clone(),
        6,
    );
    assert!(
        !again.accepted && again.reason.contains("being written"),
        "{again:?}"
    );
    // The worker restarts while the commit is written: it waits.
    assert!(matches!(
        s.join("a", 2, Some((g, "restarted")), 7),
        Join::Wait
    ));
    let written = c.write();
    assert!(written.is_ok(), "{written:?}");
    let v = s.finish_commit(c, written, 8);
    assert!(v.committed, "{v:?}");
    let Join::Assigned {
        assignment: next,
        resume,
    } = s.join("a", 2, None, 9)
    else {
        panic!("formed after the commit")
    };
    assert_eq!(resume.expect("resume point").position.step, 8);
    // The new group re-reaches step 8 (a slow old rank 0 too): refused, the commit intact.
    let staging = tmp
        .path()
        .join(checkpoint::staging_name(next.generation, 8));
    let files = checkpoint_files(&staging);
    let v = s.vote(
        Voter::rank(0, next.generation),
        pos,
        Some(staging),
        files,
        10,
    );
    assert!(
        !v.accepted && v.reason.contains("not after the committed step"),
        "{v:?}"
    );
    checkpoint::verify(&tmp.path().join(checkpoint::folder_name(8))).expect("intact");
    assert!(s.failed().is_none());
}

/// Pruning is best effort after a durable commit: its failure is logged and counted apart,
/// the commit stands, and no number of them stops the job.
#[test]
fn a_failed_pruning_does_not_fail_the_commit() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut s = JobState::new(job(tmp.path()), one_worker(10_000), false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    let g = assignment.generation;
    for step in [4u64, 8, 12, 16] {
        let staging = tmp.path().join(checkpoint::staging_name(g, step));
        let files = checkpoint_files(&staging);
        let pos = Position {
            step,
            loss_scale: 1.0,
            ..Position::default()
        };
        let Cast::Commit(c) = s.cast_vote(Voter::rank(0, g), pos, Some(staging), files, step)
        else {
            panic!("commit")
        };
        let written = c.write();
        let v = s.finish_commit(c, written, step);
        assert!(v.committed);
        s.finish_pruning(Err(format!(
            "pruning {}: disk I/O error",
            tmp.path().display()
        )));
    }
    assert_eq!(s.prune_failures().0, 4);
    assert!(s.failed().is_none(), "pruning failures do not stop the job");
    assert_eq!(s.status(20).commit_failures, 0);
    assert!(
        s.log
            .iter()
            .any(|l| l.contains("failed (the commit stands)"))
    );
}

/// A `coordinator.json` that exists but cannot be read is an error, never "absent" (which
/// would restart the generations at 0 and overwrite it); a damaged one is kept aside.
#[test]
fn an_unreadable_state_file_is_an_error_and_a_damaged_one_is_kept_aside() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = state_file(&job(tmp.path()));
    // A folder where the file should be: reading it fails with an error other than absent.
    std::fs::create_dir_all(&path).expect("mkdir");
    let err = JobState::new(job(tmp.path()), one_worker(10_000), true).expect_err("unreadable");
    assert!(
        err.contains("coordinator.json") && err.contains("cannot read"),
        "{err}"
    );
    assert!(path.is_dir(), "left as it was");
    std::fs::remove_dir(&path).expect("rmdir");
    std::fs::write(&path, b"{ not json").expect("write");
    let s = JobState::new(job(tmp.path()), one_worker(10_000), true).expect("damaged: goes on");
    assert!(s.log.iter().any(|l| l.contains("is damaged")));
    assert!(path.with_extension("json.damaged").exists(), "kept aside");
}

/// A committed checkpoint damaged after its commit is not handed out: the next group resumes
/// from the newest one that verifies (all ranks alike).
#[test]
fn a_damaged_committed_checkpoint_falls_back_to_the_newest_that_verifies() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut j = job(tmp.path());
    j.checkpoint.keep = 3;
    let mut s = JobState::new(j, one_worker(10_000), false).expect("state");
    let Join::Assigned { assignment, .. } = s.join("a", 1, None, 0) else {
        panic!("group")
    };
    let g = assignment.generation;
    for step in [4u64, 8] {
        let staging = tmp.path().join(checkpoint::staging_name(g, step));
        let files = checkpoint_files(&staging);
        let pos = Position {
            step,
            loss_scale: 1.0,
            ..Position::default()
        };
        assert!(
            s.vote(Voter::rank(0, g), pos, Some(staging), files, step)
                .committed
        );
    }
    // The newest one's weights are damaged on the storage.
    std::fs::write(
        tmp.path()
            .join(checkpoint::folder_name(8))
            .join("model.safetensors"),
        b"damaged",
    )
    .expect("write");
    let Join::Assigned { resume, .. } = s.join("a", 2, Some((g, "restarted")), 20) else {
        panic!("re-formed")
    };
    assert_eq!(resume.expect("resume point").position.step, 4);
    assert!(s.log.iter().any(|l| l.contains("does not verify")));
}
