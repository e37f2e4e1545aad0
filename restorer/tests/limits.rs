//! The restorer when the system refuses it threads (issue 8, item 10): restore, verify and capture
//! run as an unprivileged user under `RLIMIT_NPROC` = 1 (root ignores the limit), so no thread can
//! start. Each must stop with one line naming the threads it could not start, exit status 1, and no
//! panic. Needs root (to switch users with `setpriv`).

mod common;

use bmr_tests::util::{Cmd, Output};
use common::*;
use std::path::Path;

/// A uid with no processes: RLIMIT_NPROC counts every process and thread of the real uid.
const UID: &str = "54321";

/// `restorer ARGS` as `UID` with at most one process or thread for that user.
fn restorer_without_threads(args: &[&str]) -> Output {
    without_threads(env!("CARGO_BIN_EXE_restorer"), args)
}

/// `PROGRAM ARGS` as `UID` with at most one process or thread for that user.
fn without_threads(program: &str, args: &[&str]) -> Output {
    Cmd::new("setpriv")
        .args([
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
            "prlimit",
            "--nproc=1:1",
            "--",
            program,
        ])
        .args(args)
        .run()
}

#[track_caller]
fn one_line_refusal(out: &Output) {
    one_line_refusal_of("restorer", out)
}

#[track_caller]
fn one_line_refusal_of(program: &str, out: &Output) {
    assert!(!out.success(), "succeeded:\n{}", out.describe());
    assert!(
        !out.all().contains("panicked"),
        "it panicked:\n{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with(&format!("{program}: error")))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.describe());
    assert!(
        errors[0].contains("threads: Resource temporarily unavailable"),
        "{}",
        out.describe()
    );
}

fn chown(p: &Path) {
    Cmd::new("chown").arg(format!("{UID}:{UID}")).arg(p).ok();
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn restore_verify_and_capture_without_threads_fail_in_one_line() {
    let env = Env::new("no-threads");
    let fx = bmr_tests::fixtures::gpt_server().unwrap();
    env.ingest("lim1", &[&fx.image]);
    let srv = env.serve();
    let t = env.file("target.img", fx.size);
    chown(&t);
    let target = t.display().to_string();

    let out = restorer_without_threads(&[
        "restore", "--from", &srv.url, "--host", "lim1", "--target", &target,
    ]);
    one_line_refusal(&out);
    assert!(out.stderr.contains("worker threads"), "{}", out.describe());

    let out = restorer_without_threads(&[
        "verify", "--from", &srv.url, "--host", "lim1", "--target", &target,
    ]);
    one_line_refusal(&out);

    let base = srv.url.trim_end_matches("/store").to_string();
    let image = fx.image.display().to_string();
    let out = restorer_without_threads(&["capture", "--to", &base, "--host", "lim2", &image]);
    one_line_refusal(&out);

    // With threads allowed, the same restore works (the refusals above were the limit's).
    let (out, _) = restore(&srv.url, "lim1", &[&t], &[]);
    assert!(out.success(), "{}", out.describe());
}

#[test]
#[ignore = "system test (root: loop devices, mounts): scripts/test runs it"]
fn ingest_without_threads_fails_in_one_line() {
    // The chunker is shared by ingest and capture: an ingest into a store of that user's.
    let dir = bmr_tests::util::Workspace::artifacts("restorer-no-threads-ingest");
    std::fs::create_dir_all(&dir).unwrap();
    chown(&dir);
    let image = dir.join("disk.raw");
    std::fs::write(&image, vec![7u8; 8 * MIB as usize]).unwrap();
    let store = dir.join("store");
    let appliance = bmr_tests::util::Workspace::bin("appliance");
    let appliance = appliance.to_str().unwrap();
    let s = store.to_str().unwrap();
    let out = Cmd::new("setpriv")
        .args([
            &format!("--reuid={UID}"),
            &format!("--regid={UID}"),
            "--clear-groups",
        ])
        .args([appliance, "init", "--store", s])
        .run();
    assert!(out.success(), "{}", out.describe());
    let img = image.to_str().unwrap();
    let out = without_threads(
        appliance,
        &["ingest", "--raw", "--host", "lim3", "--store", s, img],
    );
    one_line_refusal_of("appliance", &out);
}
