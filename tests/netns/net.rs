//! Hosts as Linux network namespaces on a private bridge.
//!
//! The bridge lives in a namespace of its own (the "switch"), so the test
//! adds nothing to the machine's own network: no address, route or NAT
//! outside the namespaces it made. Every name starts with `cht<pid>-<tag>`;
//! a run finding names of a process that no longer exists (a crashed or
//! killed earlier run) kills what runs in them and deletes them first.
//! [`Net`]'s `Drop` deletes everything it made, also when a test panics.

use std::process::{Command, Output, Stdio};

/// The private subnet; the switch has no address on it.
pub const SUBNET: &str = "10.77.0";

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    let out = run(Command::new("ip").args(args));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this machine lets us make namespaces: root and a working `ip netns`.
/// `Err` says why not.
pub fn available() -> Result<(), String> {
    let uid = run(Command::new("id").arg("-u"));
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root".into());
    }
    let probe = format!("chtprobe{}", std::process::id());
    let out = match Command::new("ip")
        .args(["netns", "add", &probe])
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) => o,
        Err(e) => return Err(format!("`ip` not runnable: {e}")),
    };
    if !out.status.success() {
        return Err(format!(
            "ip netns add failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let _ = Command::new("ip").args(["netns", "del", &probe]).output();
    Ok(())
}

fn namespaces() -> Vec<String> {
    let out = run(Command::new("ip").args(["netns", "list"]));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Kills every process in namespace `ns`, then deletes it.
fn delete_namespace(ns: &str) {
    let pids = run(Command::new("ip").args(["netns", "pids", ns]));
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        let _ = Command::new("kill").args(["-9", pid]).output();
    }
    // A killed process may take a moment to release the namespace; `del`
    // works regardless (the namespace goes when its last process does).
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes namespaces left by runs whose process is gone.
pub fn remove_stale() {
    for ns in namespaces() {
        let Some(rest) = ns.strip_prefix("cht") else {
            continue;
        };
        let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if pid.is_empty() || !rest[pid.len()..].starts_with('-') {
            continue;
        }
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("netns: removing stale namespace {ns}");
        delete_namespace(&ns);
    }
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
    /// The switch-side end of the host's link.
    port: String,
}

pub struct Net {
    pub prefix: String,
    switch: String,
    hosts: Vec<String>,
}

impl Net {
    /// A switch namespace with a bridge, for hosts named `<prefix>-<name>`.
    pub fn new(tag: &str) -> Net {
        let prefix = format!("cht{}-{tag}", std::process::id());
        let switch = format!("{prefix}-sw");
        let net = Net {
            prefix,
            switch: switch.clone(),
            hosts: vec![switch.clone()],
        };
        ip(&["netns", "add", &switch]);
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &switch, "link", "set", "br0", "up"]);
        net
    }

    /// A host: a namespace with `lo` up and `eth0` = `10.77.0.<octet>/24` on
    /// the bridge.
    pub fn host(&mut self, name: &str, octet: u8) -> Host {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        let port = format!("p{octet}");
        ip(&[
            "-n",
            &self.switch,
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            "master",
            "br0",
            "up",
        ]);
        let ipaddr = format!("{SUBNET}.{octet}");
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{ipaddr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        Host {
            name: name.into(),
            ns,
            ip: ipaddr,
            port,
        }
    }

    /// Cuts (`up = false`) or restores a host's link: a partition from every
    /// other host, without resets (packets are just dropped).
    pub fn set_link(&self, host: &Host, up: bool) {
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &host.port,
            if up { "up" } else { "down" },
        ]);
    }
}

/// Partitions two hosts from each other only (`cut = true`) or heals that:
/// blackhole routes in both namespaces, so each one's packets to the other
/// are dropped while both still reach every other host.
pub fn set_pair_cut(a: &Host, b: &Host, cut: bool) {
    let verb = if cut { "add" } else { "del" };
    ip(&[
        "-n",
        &a.ns,
        "route",
        verb,
        "blackhole",
        &format!("{}/32", b.ip),
    ]);
    ip(&[
        "-n",
        &b.ns,
        "route",
        verb,
        "blackhole",
        &format!("{}/32", a.ip),
    ]);
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.hosts.iter().rev() {
            delete_namespace(ns);
        }
    }
}

/// `GET url` from namespace `ns` (curl), the body or None.
pub fn http_get(ns: &str, url: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "curl", "-sf", "--max-time", "2", url])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
