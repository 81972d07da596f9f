//! `chat bench …`: the load generator is its own binary (`chat-bench`, crate
//! `bench/`), so the product binary does not carry it; this runs it with the
//! same arguments, from next to `chat` (where cargo and the image put both)
//! or else from `PATH`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const BENCH_BIN: &str = "chat-bench";

fn bench_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name(BENCH_BIN))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(BENCH_BIN))
}

/// Runs `chat-bench args…` in place of this process (on Unix), or as a child
/// whose exit status becomes ours.
pub fn forward(args: &[OsString]) -> ExitCode {
    let bin = bench_binary();
    let mut command = Command::new(&bin);
    command.args(args);
    #[cfg(unix)]
    let error = {
        use std::os::unix::process::CommandExt;
        command.exec()
    };
    #[cfg(not(unix))]
    let error = match command.status() {
        Ok(status) => return ExitCode::from(status.code().unwrap_or(1).clamp(0, 255) as u8),
        Err(e) => e,
    };
    eprintln!(
        "chat bench: cannot run {}: {error} (build it with `cargo build --release -p chat-bench`)",
        bin.display()
    );
    ExitCode::from(super::EXIT_USAGE)
}
