//! Helpers shared by the binaries.

pub mod shard_cat;
pub mod student_fit;
pub mod teacher_dump;

/// `--device`'s value.
pub fn parse_device(s: &str) -> Result<kd_model::DeviceChoice, String> {
    s.parse().map_err(|e: kd_model::DeviceError| e.to_string())
}

/// `--dtype f32|bf16|f16`.
pub fn parse_dtype(s: &str) -> Result<kd_model::Dtype, String> {
    s.parse().map_err(|e: kd_model::UnknownDtype| e.to_string())
}

/// The value of a setting given under its new name, or under its former one with a note on
/// stderr.
pub fn renamed<T>(new: Option<T>, old: Option<T>, old_name: &str, new_name: &str) -> Option<T> {
    if new.is_none() && old.is_some() {
        eprintln!(
            "note: {old_name} is now {new_name}; the former name is accepted until the next release"
        );
        return old;
    }
    new
}

/// Runs a binary's body: prints the error chain and exits 1 on failure; a closed output pipe
/// (`shard-cat … | head`) ends quietly with status 0.
pub fn run_main(body: impl FnOnce() -> anyhow::Result<()>) -> ! {
    keep_freed_memory();
    match body() {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                std::process::exit(0);
            }
            eprintln!("error: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes joined by `: `, leaving out a cause whose text the message so far
/// already holds (errors that name their file also print their source, so the plain chain
/// would repeat the path and the cause).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if msg.contains(&s) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&s);
    }
    msg
}

/// Makes glibc's allocator serve large blocks from the heap and keep freed memory, instead of
/// mapping and unmapping every large tensor: training allocates and frees buffers of
/// hundreds of megabytes each step, and the kernel zeroing fresh pages cost much of the run
/// time (the measured speed-up of `student-fit` is in docs/performance.md). Peak memory is
/// unchanged: freed blocks are reused, not accumulated.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Sets the number of CPU threads candle and rayon use (0 = all cores).
pub fn set_threads(n: usize) {
    if n > 0 {
        // SAFETY: called first thing in main, before any other thread exists; candle and rayon
        // read the variable when their pools start.
        unsafe {
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    }
}

/// Human-readable byte count.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b} B")
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{path}: {source}")]
    struct InFile {
        path: String,
        source: std::io::Error,
    }

    /// A cause that the message above it already prints is not printed again.
    #[test]
    fn error_chain_leaves_out_repeated_causes() {
        let inner = std::io::Error::other("unsupported normalizer `NFKC`");
        let e = anyhow::Error::new(InFile {
            path: "m/tokenizer.json".into(),
            source: inner,
        })
        .context("loading the teacher m");
        assert_eq!(
            super::error_chain(&e),
            "loading the teacher m: m/tokenizer.json: unsupported normalizer `NFKC`"
        );
        let plain = anyhow::anyhow!("a").context("b");
        assert_eq!(super::error_chain(&plain), "b: a");
    }
}
