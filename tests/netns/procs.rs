//! A process running in a host's namespace (`ip netns exec`, which execs the
//! program, so the child's pid is the program's), its output in a log file.
//! Killed on drop, also when the test panics.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proc {
    pub name: String,
    ns: String,
    program: PathBuf,
    args: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(
        name: &str,
        ns: &str,
        program: impl Into<PathBuf>,
        args: &[String],
        log: PathBuf,
    ) -> Proc {
        let mut p = Proc {
            name: name.into(),
            ns: ns.into(),
            program: program.into(),
            args: args.to_vec(),
            log,
            child: None,
        };
        p.start();
        p
    }

    /// (Re)starts the process with the same command line; output is appended.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new("ip");
        strip_chat_env(&mut cmd);
        let child = cmd
            .args(["netns", "exec", &self.ns])
            .arg(&self.program)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", self.name));
        self.child = Some(child);
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .output();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "netns: {} did not stop within {grace:?}; killing it",
            self.name
        );
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Waits for the process to exit on its own, at most `limit`; true if it did.
    pub fn wait(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            match self.child.as_mut().map(|c| c.try_wait()) {
                None => return true,
                Some(Ok(Some(_))) => {
                    self.child = None;
                    return true;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        false
    }

    /// Panics if the process has exited (with its log's tail).
    pub fn assert_running(&mut self) {
        if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
            panic!("{} exited with {status}:\n{}", self.name, self.log_tail());
        }
    }

    pub fn log_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// `chat` reads `CHAT_*` variables as configuration: it gets none of the test's
/// own (e.g. `CHAT_NETNS_KEEP`, `CHAT_TEST_BACKEND`).
pub fn strip_chat_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CHAT_") {
            cmd.env_remove(k);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}
