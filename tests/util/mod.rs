//! Shared helpers of the end-to-end tests: fixture paths, temp dirs, running the binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository: `KD_REPO_ROOT` (a test binary run from another checkout, as
/// `scripts/gpu_check.sh` runs one built elsewhere), else where the tests were built.
pub fn root() -> PathBuf {
    std::env::var_os("KD_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The reference data (`tests/reference`, see its README), or `KD_REFERENCE_DIR`.
pub fn reference_dir() -> PathBuf {
    std::env::var_os("KD_REFERENCE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("tests/reference"))
}

/// The real teacher GGUF: `KD_TEACHER_GGUF`, else `data/models/SmolLM2-135M-Instruct.Q4_1.gguf`
/// (fetched by `scripts/setup.sh`). Tests that need it skip with a message when it is absent,
/// unless `KD_REQUIRE_TEACHER=1` (set by CI), which turns absence into a failure.
pub fn teacher_gguf() -> Option<PathBuf> {
    let p = std::env::var_os("KD_TEACHER_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("data/models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    if p.exists() {
        return Some(p);
    }
    if std::env::var("KD_REQUIRE_TEACHER").is_ok_and(|v| v == "1") {
        panic!(
            "KD_REQUIRE_TEACHER=1 but the teacher is missing at {}",
            p.display()
        );
    }
    eprintln!(
        "skipped: real teacher not found at {} (run scripts/setup.sh)",
        p.display()
    );
    None
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kd-test-")
        .tempdir()
        .expect("temp dir")
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "teacher-dump" => PathBuf::from(env!("CARGO_BIN_EXE_teacher-dump")),
        "shard-cat" => PathBuf::from(env!("CARGO_BIN_EXE_shard-cat")),
        "student-fit" => PathBuf::from(env!("CARGO_BIN_EXE_student-fit")),
        other => panic!("unknown binary {other}"),
    }
}

/// Runs a binary with arguments; returns its output (does not assert success).
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("binary runs")
}

pub fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

/// Writes lines of JSON to a file.
pub fn write_jsonl(path: &Path, rows: &[serde_json::Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(path, text).expect("write jsonl");
}

/// Starts a binary with arguments in the background (stdout and stderr discarded), with the
/// same environment as [`run`]; the caller waits for or kills it.
pub fn spawn(name: &str, args: &[&str]) -> std::process::Child {
    Command::new(bin(name))
        .args(args)
        .env("RAYON_NUM_THREADS", "2")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("binary starts")
}

/// Caps every file `cmd`'s process writes at `cap` bytes (RLIMIT_FSIZE, SIGXFSZ ignored): a
/// write past the cap fails with EFBIG, as on a full disk, without root or a tmpfs.
pub fn limit_file_size(cmd: &mut Command, cap: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: cap,
                rlim_max: cap,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `python3` with the repository's `python/` on its path and without `LD_LIBRARY_PATH`:
/// torch loads its own CUDA libraries, never a test's stand-ins.
pub fn python_torch() -> Command {
    let mut c = Command::new("python3");
    c.env_remove("LD_LIBRARY_PATH")
        .env("PYTHONPATH", root().join("python"));
    c
}

/// Whether `python3` imports `modules` (e.g. `"torch, transformers"`); when it cannot, the
/// test is skipped, unless `KD_REQUIRE_TORCH=1` (CI), which makes it a failure.
pub fn python_imports_torch(modules: &str) -> bool {
    let import = format!("import {modules}");
    let ok = python_torch()
        .args(["-c", &import])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("KD_REQUIRE_TORCH").is_ok_and(|v| v == "1") {
            panic!("KD_REQUIRE_TORCH=1 but `python3 -c '{import}'` fails");
        }
        eprintln!("skipped: python3 cannot {import}");
    }
    ok
}
