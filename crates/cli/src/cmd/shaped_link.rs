//! A shaped link for `ferry bench migrate --link RATE`: a network namespace joined to
//! this one by a veth pair whose two ends are each shaped with `tc tbf` to RATE. Host b
//! runs inside the namespace and host a outside, so every migration, either way, crosses
//! the shaped link (as it would cross a 10 or 25 Gbit/s network between two machines),
//! and the raw TCP rate through the same link is measured beside each figure. Needs
//! root; everything is removed when the link is dropped.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context};

use crate::cmd::child::Killed;

/// Host a's address, outside the namespace.
pub const ADDR_A: &str = "10.213.0.1";
/// Host b's address, inside it.
pub const ADDR_B: &str = "10.213.0.2";

/// The namespace, the veth pair and their shaping.
pub struct ShapedLink {
    ns: String,
    veth_a: String,
}

/// Runs `program args`, failing with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program} (iproute2)"))?;
    ensure!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Bits per second in a `tc` rate (`10gbit`, `25gbit`, `800mbit`).
fn rate_bits(rate: &str) -> anyhow::Result<f64> {
    let lower = rate.to_ascii_lowercase();
    let (number, unit) = lower
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((lower.as_str(), ""), |i| lower.split_at(i));
    let scale = match unit {
        "gbit" => 1e9,
        "mbit" => 1e6,
        "kbit" => 1e3,
        "bit" | "" => 1.0,
        other => bail!("unknown rate unit '{other}' in '{rate}' (use gbit, mbit or kbit)"),
    };
    let n: f64 = number
        .parse()
        .with_context(|| format!("'{rate}' is not a rate such as 10gbit"))?;
    ensure!(n > 0.0, "the link rate must be positive");
    Ok(n * scale)
}

impl ShapedLink {
    /// Creates the namespace and the shaped pair.
    pub fn create(rate: &str) -> anyhow::Result<Self> {
        // SAFETY: geteuid only reads this process's credentials.
        if unsafe { libc::geteuid() } != 0 {
            bail!(
                "--link needs root: it creates a network namespace and shapes a veth pair with tc"
            );
        }
        let bits = rate_bits(rate)?;
        for stale in remove_stale(Path::new(NETNS_DIR)) {
            eprintln!("removed the shaped link {stale}, left by a bench that was stopped");
        }
        let link = Self::of_process(std::process::id());
        let veth_b = link.veth_a.replacen("fba", "fbb", 1);
        run("ip", &["netns", "add", &link.ns])?;
        run(
            "ip",
            &[
                "link",
                "add",
                &link.veth_a,
                "type",
                "veth",
                "peer",
                "name",
                &veth_b,
            ],
        )?;
        run("ip", &["link", "set", &veth_b, "netns", &link.ns])?;
        run(
            "ip",
            &["addr", "add", &format!("{ADDR_A}/30"), "dev", &link.veth_a],
        )?;
        run("ip", &["link", "set", &link.veth_a, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &link.ns];
            all.extend_from_slice(args);
            run("ip", &all)
        };
        in_ns(&["ip", "addr", "add", &format!("{ADDR_B}/30"), "dev", &veth_b])?;
        in_ns(&["ip", "link", "set", &veth_b, "up"])?;
        in_ns(&["ip", "link", "set", "lo", "up"])?;
        // A bucket of 10 ms of traffic: enough for the timer's granularity at 10 Gbit/s
        // and more, small enough to shape bursts.
        let burst = format!("{}", ((bits / 8.0 / 100.0) as u64).max(64 << 10));
        let tbf = ["tbf", "rate", rate, "burst", &burst, "latency", "20ms"];
        let mut on_a = vec!["qdisc", "add", "dev", &link.veth_a, "root"];
        on_a.extend_from_slice(&tbf);
        run("tc", &on_a)?;
        let mut on_b = vec!["tc", "qdisc", "add", "dev", &veth_b, "root"];
        on_b.extend_from_slice(&tbf);
        in_ns(&on_b)?;
        Ok(link)
    }

    /// The names the link of bench process `pid` has.
    fn of_process(pid: u32) -> Self {
        Self {
            ns: format!("{NS_PREFIX}{pid}"),
            veth_a: format!("fba{}", pid % 1_000_000_000),
        }
    }

    /// `program` to run inside the namespace.
    pub fn command_inside(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.ns]).arg(program);
        command
    }

    /// Raw TCP throughput from outside to inside, one stream of 1 MiB writes for
    /// `bytes`, bytes/s: what the link gives a single connection.
    pub fn throughput(&self, bytes: u64) -> anyhow::Result<f64> {
        let ns_file = std::fs::File::open(format!("/var/run/netns/{}", self.ns))
            .context("opening the namespace")?;
        // The receiving socket is made by a thread that entered the namespace.
        tcp_throughput(bytes, move || {
            // SAFETY: setns moves only this thread into the namespace the open file
            // names; the thread ends with the measurement.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            TcpListener::bind(format!("{ADDR_B}:0"))
        })
    }
}

/// The CPUs this process may run on (its scheduler affinity), in order.
pub fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `set`.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(std::io::Error::last_os_error()).context("reading this process's CPUs");
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// A core: its package and core ids.
pub type Core = (u32, u32);

/// A core (if known) and those of the CPUs split that are its threads.
type CoreThreads = (Option<Core>, Vec<usize>);

/// The core CPU `cpu` is a thread of, as sysfs says.
pub fn core_of(cpu: usize) -> Option<Core> {
    let read = |name: &str| {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/topology/{name}");
        std::fs::read_to_string(path).ok()?.trim().parse().ok()
    };
    Some((read("physical_package_id")?, read("core_id")?))
}

/// Halves `cpus` into two disjoint, non-empty sets, whole cores to each (`core_of` says
/// which core a CPU is a thread of; one it cannot place is a core of its own), the first
/// set getting the smaller half when the cores are odd in number: one per host, as two
/// machines each have their own cores. Hyperthreads of one core split between the hosts
/// would share its units, which two machines do not.
pub fn split_cpus(
    cpus: &[usize],
    core_of: impl Fn(usize) -> Option<Core>,
) -> anyhow::Result<(Vec<usize>, Vec<usize>)> {
    let mut cores: Vec<CoreThreads> = Vec::new();
    for &cpu in cpus {
        let core = core_of(cpu);
        match cores.iter_mut().find(|(c, _)| core.is_some() && *c == core) {
            Some((_, threads)) => threads.push(cpu),
            None => cores.push((core, vec![cpu])),
        }
    }
    ensure!(
        cores.len() >= 2,
        "splitting CPUs between two hosts needs at least 2 cores, and this process may use {} CPUs of {} core",
        cpus.len(),
        cores.len()
    );
    let (a, b) = cores.split_at(cores.len() / 2);
    let flat = |cores: &[CoreThreads]| {
        cores
            .iter()
            .flat_map(|(_, cpus)| cpus.iter().copied())
            .collect()
    };
    Ok((flat(a), flat(b)))
}

/// Makes `command`'s process (and every thread and child it starts) run on `cpus` only.
pub fn run_on(command: &mut Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt;
    // SAFETY: an all-zero cpu_set_t is an empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus.iter().filter(|&&cpu| cpu < libc::CPU_SETSIZE as usize) {
        // SAFETY: `cpu` is below CPU_SETSIZE, the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: between fork and exec the closure makes one system call, which is
    // async-signal-safe, on a set it owns; affinity is inherited through exec.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Writes CPU numbers as `taskset -c` does (`0`, `0,1`, `2,3`).
pub fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Raw TCP throughput to a listener `listen` makes (on the receiving thread), one stream
/// of 1 MiB writes for `bytes`, bytes/s.
pub fn tcp_throughput(
    bytes: u64,
    listen: impl FnOnce() -> std::io::Result<TcpListener> + Send + 'static,
) -> anyhow::Result<f64> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let listener = listen()?;
        let _ = ready_tx.send(listener.local_addr()?);
        // Within a deadline: a sender whose connect failed never comes, and this thread
        // must not wait for it for ever.
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let Ok(addr) = ready_rx.recv() else {
        let why = reader
            .join()
            .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        bail!("the receiver did not start: {:?}", why.err());
    };
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 1 << 20];
    let started = Instant::now();
    for _ in 0..bytes >> 20 {
        s.write_all(&buf)?;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    ensure!(
        got == bytes >> 20 << 20,
        "the link lost data ({got} of {bytes} bytes)"
    );
    Ok(got as f64 / secs)
}

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/var/run/netns";

/// A bench's namespace is this and its process id.
const NS_PREFIX: &str = "ferry-bench-";

/// Removes the links (in `netns_dir`) of bench processes that no longer run: one stopped
/// by a signal never dropped its link, whose addresses would clash with the next one's.
/// Returns the namespaces removed.
fn remove_stale(netns_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(netns_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let pid: u32 = name.strip_prefix(NS_PREFIX)?.parse().ok()?;
            if pid == 0 || Path::new(&format!("/proc/{pid}")).exists() {
                return None;
            }
            drop(ShapedLink::of_process(pid));
            Some(name)
        })
        .collect()
}

impl Drop for ShapedLink {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the other.
        let _ = run("ip", &["netns", "del", &self.ns]);
        let _ = run("ip", &["link", "del", &self.veth_a]);
    }
}

/// A `ferry host serve` child process, killed on drop, and where it listens.
pub struct HostProcess {
    _child: Killed,
    /// Its API (`http://IP:PORT`).
    pub api: String,
    /// Its migration address.
    pub migration_addr: String,
}

impl HostProcess {
    /// Starts `command` (a `ferry host serve ...`) with the cluster `secret`, and reads
    /// where it listens from its first line.
    pub fn start(mut command: Command, secret: &str) -> anyhow::Result<Self> {
        let command = command.env("FERRY_SECRET", secret).stderr(Stdio::inherit());
        let mut child = Killed::spawn(command, "`ferry host serve`")?;
        let line = child.first_line("the host")?;
        // "ferry host a: API on http://IP:P, migrations on IP:Q ..."
        let api = line
            .split("API on ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .map(str::to_string);
        let migration_addr = line
            .split("migrations on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(str::to_string);
        match (api, migration_addr) {
            (Some(api), Some(migration_addr)) => Ok(Self {
                _child: child,
                api,
                migration_addr,
            }),
            _ => bail!("the host did not say where it listens: {line:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_raw_rate_of_loopback_is_measured_over_every_byte() {
        let rate = tcp_throughput(4 << 20, || TcpListener::bind("127.0.0.1:0")).unwrap();
        assert!(rate > 0.0 && rate.is_finite(), "{rate}");
        // A receiver that cannot listen is said so, not waited for.
        let refused = tcp_throughput(1 << 20, || Err(std::io::ErrorKind::AddrInUse.into()));
        assert!(refused.is_err());
    }

    #[test]
    fn cpus_split_into_two_halves_of_whole_cores_and_one_core_is_refused() {
        let own_cores = |cpu: usize| Some((0, cpu as u32));
        let (a, b) = split_cpus(&[0, 1], own_cores).unwrap();
        assert_eq!((a, b), (vec![0], vec![1]));
        let (a, b) = split_cpus(&[0, 2, 4, 5, 7], own_cores).unwrap();
        assert_eq!((a, b), (vec![0, 2], vec![4, 5, 7]));
        // Hyperthreads numbered as Intel does (CPU i and i+2 are one core's): each host
        // gets whole cores, not one thread of each.
        let siblings = |cpu: usize| Some((0, (cpu % 2) as u32));
        let (a, b) = split_cpus(&[0, 1, 2, 3], siblings).unwrap();
        assert_eq!((a, b), (vec![0, 2], vec![1, 3]));
        // CPUs sysfs cannot place are cores of their own.
        let (a, b) = split_cpus(&[5, 6], |_| None).unwrap();
        assert_eq!((a, b), (vec![5], vec![6]));
        assert!(split_cpus(&[3], own_cores).is_err());
        assert!(
            split_cpus(&[0, 1], |_| Some((0, 0))).is_err(),
            "one core's threads"
        );
        assert_eq!(cpu_list(&[4, 5, 7]), "4,5,7");
    }

    #[test]
    fn a_child_run_on_one_cpu_is_allowed_that_cpu_only() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let last = *cpus.last().unwrap();
        let mut command = Command::new("grep");
        command.args(["Cpus_allowed_list", "/proc/self/status"]);
        run_on(&mut command, &[last]);
        let out = command.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let line = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            line.split_whitespace().nth(1),
            Some(last.to_string().as_str()),
            "{line}"
        );
    }

    #[test]
    fn rates_read_as_tc_writes_them() {
        assert_eq!(rate_bits("10gbit").unwrap(), 1e10);
        assert_eq!(rate_bits("800Mbit").unwrap(), 8e8);
        assert!(rate_bits("10gbps").is_err());
        assert!(rate_bits("fast").is_err());
        assert!(rate_bits("0gbit").is_err());
    }

    #[test]
    fn a_link_left_by_a_stopped_bench_is_removed_and_a_running_ones_is_kept() {
        // SAFETY: geteuid only reads this process's credentials.
        if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
            ferry_testdata::cannot_run_here(
                "a_link_left_by_a_stopped_bench_is_removed_and_a_running_ones_is_kept",
                "needs root and ip",
            );
            return;
        }
        // A process that has ended, whose id is not reused while the test runs.
        let mut child = Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = ShapedLink::of_process(dead);
        let alive = ShapedLink::of_process(std::process::id());
        for link in [&stale, &alive] {
            run("ip", &["netns", "add", &link.ns]).unwrap();
        }
        let removed = remove_stale(Path::new(NETNS_DIR));
        let left = |link: &ShapedLink| Path::new(NETNS_DIR).join(&link.ns).exists();
        assert!(!left(&stale), "{removed:?}");
        assert!(removed.contains(&stale.ns), "{removed:?}");
        assert!(left(&alive), "a running bench's link is kept");
        drop(alive);
    }
}
