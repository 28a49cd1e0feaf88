//! Node processes: the real `pegaflow-node` binary, one process per simulated host, each on
//! its own socket, HTTP port, log file and SSD directory under the run's directory. The
//! harness starts, kills (SIGKILL), stops (SIGTERM) and restarts them, and keeps each
//! lifetime's counters, since a restarted node starts its counters from zero. With the fabric
//! on, the nodes form one cluster on loopback ([`FabricPlan`]).

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pegaflow_actors::client::Client;
use pegaflow_actors::stats::NodeStats;
use pegaflow_config::Size;

use crate::error::ScenarioError;
use crate::http;
use crate::proxy::{bind_pair, LinkProxy};
use crate::scenario::{ClusterSpec, FabricSpec, Scenario};

/// How long a node may take to answer `hello` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `pegaflow-node`: `$PEGAFLOW_NODE_BIN`, else next to the running executable (the
/// harness binary sits in `target/<profile>/`, test executables in `target/<profile>/deps/`).
pub fn node_binary() -> Result<PathBuf, ScenarioError> {
    if let Some(path) = std::env::var_os("PEGAFLOW_NODE_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ScenarioError::NodeBinary(path.display().to_string()))
        };
    }
    let exe = std::env::current_exe().map_err(ScenarioError::io("current executable"))?;
    let mut looked = Vec::new();
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("pegaflow-node");
        if candidate.is_file() {
            return Ok(candidate);
        }
        looked.push(candidate.display().to_string());
    }
    Err(ScenarioError::NodeBinary(looked.join(", ")))
}

/// A tmpfs the harness mounted for a node's SSD tier; unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Result<Self, String> {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(dir)
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if status.status.success() {
            Ok(Self {
                dir: dir.to_path_buf(),
            })
        } else {
            Err(String::from_utf8_lossy(&status.stderr).trim().to_string())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// The fabric of a cluster: one shared secret, each node's listen address, and a link proxy in
/// front of every node a link fault targets (that node advertises the proxy's address, so all
/// its peers reach it through the proxy).
pub struct FabricPlan {
    spec: FabricSpec,
    secret: String,
    listen: Vec<SocketAddr>,
    /// The address peers reach each node at: its proxy's, else its listen address.
    advertise: Vec<SocketAddr>,
    /// Proxies not yet handed to their node.
    proxies: Vec<Option<LinkProxy>>,
}

impl FabricPlan {
    /// Picks the addresses and starts the proxies; `None` without the fabric.
    pub async fn new(scenario: &Scenario) -> Result<Option<Self>, ScenarioError> {
        let Some(spec) = scenario.fabric() else {
            return Ok(None);
        };
        let mut listen = Vec::new();
        let mut proxies = Vec::new();
        // Held until every port is chosen, so no two nodes are given the same free port.
        let mut held = Vec::new();
        for node in 0..scenario.cluster.nodes {
            let pair = bind_pair().map_err(ScenarioError::io("find a fabric port"))?;
            let addr = pair
                .0
                .local_addr()
                .map_err(ScenarioError::io("find a fabric port"))?;
            held.push(pair);
            listen.push(addr);
            let faulted = scenario
                .faults
                .iter()
                .any(|f| f.kind.link_node() == Some(node));
            let proxy = if faulted {
                let started = LinkProxy::start(addr).await;
                Some(
                    started
                        .map_err(ScenarioError::io(format!("start node {node}'s link proxy")))?,
                )
            } else {
                None
            };
            proxies.push(proxy);
        }
        drop(held);
        let advertise = listen
            .iter()
            .zip(&proxies)
            .map(|(&addr, proxy)| proxy.as_ref().map_or(addr, LinkProxy::public_addr))
            .collect();
        Ok(Some(Self {
            spec,
            secret: format!("{:032x}", rand::random::<u128>()),
            listen,
            advertise,
            proxies,
        }))
    }

    /// `node`'s `[fabric]` config section: every other node is a seed.
    fn config(&self, node: usize) -> String {
        let seeds: Vec<String> = (0..self.listen.len())
            .filter(|&other| other != node)
            .map(|other| format!("\"{}\"", self.advertise[other]))
            .collect();
        let spec = &self.spec;
        format!(
            "[fabric]\nenabled = true\nnode_id = \"node-{node}\"\nlisten = \"{}\"\n\
             advertise = \"{}\"\nseeds = [{}]\nsecret = \"{}\"\ngossip_interval_ms = {}\n\
             failure_timeout_ms = {}\nfetch_timeout_ms = {}\n",
            self.listen[node],
            self.advertise[node],
            seeds.join(", "),
            self.secret,
            spec.gossip_interval_ms,
            spec.failure_timeout_ms,
            spec.fetch_timeout_ms,
        )
    }
}

/// One node process and everything it owns on disk.
pub struct NodeProc {
    pub index: u32,
    pub socket: PathBuf,
    pub http: SocketAddr,
    /// The SSD tier's directory, when the tier is on.
    pub ssd_dir: Option<PathBuf>,
    /// The filesystem a `fill_disk` fault may fill: the tmpfs holding `ssd_dir`.
    pub fill_dir: Option<PathBuf>,
    /// Why there is no `fill_dir` although the scenario asked for one.
    pub tmpfs_error: Option<String>,
    /// The proxy in front of the node's fabric port, when a link fault targets it.
    pub link: Option<LinkProxy>,
    log: PathBuf,
    args: Vec<String>,
    binary: PathBuf,
    child: Option<Child>,
    /// Counters of lifetimes that ended, summed.
    pub past: Vec<NodeStats>,
    pub restarts: u32,
    _tmpfs: Option<Tmpfs>,
}

impl NodeProc {
    /// Lays out the node's directory (mounting a tmpfs for its SSD tier when asked, writing its
    /// fabric config when the cluster has one); does not start the process.
    pub fn prepare(
        index: u32,
        spec: &ClusterSpec,
        pool: Size,
        run_dir: &Path,
        binary: &Path,
        fabric: Option<&mut FabricPlan>,
    ) -> Result<Self, ScenarioError> {
        let dir = run_dir.join(format!("node-{index}"));
        std::fs::create_dir_all(&dir)
            .map_err(ScenarioError::io(format!("create {}", dir.display())))?;
        let socket = dir.join("node.sock");
        let http = free_port()?;
        let mut args = vec![
            "--socket".into(),
            socket.display().to_string(),
            "--http-addr".into(),
            http.to_string(),
            "--pool-size".into(),
            pool.to_string(),
            // The node refuses a page limit above the pool; ours are a few KiB anyway.
            "--max-page-size".into(),
            Size(pool.bytes().min(64 << 20)).to_string(),
            "--dma".into(),
            "host".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        let mut link = None;
        if let Some(plan) = fabric {
            let config = dir.join("node.toml");
            std::fs::write(&config, plan.config(index as usize))
                .map_err(ScenarioError::io(format!("write {}", config.display())))?;
            args.extend(["--config".into(), config.display().to_string()]);
            link = plan.proxies[index as usize].take();
        }
        let (mut ssd_dir, mut fill_dir, mut tmpfs, mut tmpfs_error) = (None, None, None, None);
        if spec.ssd.bytes() > 0 {
            let fs_dir = dir.join("ssd-fs");
            std::fs::create_dir_all(&fs_dir)
                .map_err(ScenarioError::io(format!("create {}", fs_dir.display())))?;
            if spec.ssd_tmpfs {
                // Headroom for the manifest and the segment being sealed, so only a fault fills it.
                match Tmpfs::mount(&fs_dir, spec.ssd.bytes() + (16 << 20)) {
                    Ok(mounted) => {
                        tmpfs = Some(mounted);
                        fill_dir = Some(fs_dir.clone());
                    }
                    Err(why) => tmpfs_error = Some(format!("cannot mount a tmpfs: {why}")),
                }
            }
            let tier = fs_dir.join("tier");
            std::fs::create_dir_all(&tier)
                .map_err(ScenarioError::io(format!("create {}", tier.display())))?;
            args.extend([
                "--ssd-dir".into(),
                tier.display().to_string(),
                "--ssd-size".into(),
                spec.ssd.to_string(),
            ]);
            if let Some(admission) = &spec.ssd_admission {
                args.extend(["--ssd-admission".into(), admission.clone()]);
            }
            ssd_dir = Some(tier);
        }
        Ok(Self {
            index,
            socket,
            http,
            ssd_dir,
            fill_dir,
            tmpfs_error,
            link,
            log: dir.join("node.log"),
            args,
            binary: binary.to_path_buf(),
            child: None,
            past: Vec::new(),
            restarts: 0,
            _tmpfs: tmpfs,
        })
    }

    fn fail(&self, why: impl Into<String>) -> ScenarioError {
        ScenarioError::Node {
            node: self.index,
            why: why.into(),
        }
    }

    /// Starts the process and waits until it answers on its socket.
    pub async fn start(&mut self) -> Result<(), ScenarioError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(ScenarioError::io(format!("open {}", self.log.display())))?;
        let mut command = Command::new(&self.binary);
        // The node reads `PEGAFLOW_*` variables as config keys; the harness's own
        // (`PEGAFLOW_NODE_BIN`, ...) would make it refuse to start, and a user's would make
        // the run differ from the scenario file.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("PEGAFLOW_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| self.fail(format!("cannot start {}: {e}", self.binary.display())))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if Client::connect(&self.socket).await.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(self.fail(format!(
                        "exited with {status} while starting; see {}: {}",
                        self.log.display(),
                        self.log_tail()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(self.fail(format!(
                    "not serving after {START_TIMEOUT:?}; see {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process id, while running (a fault may signal it from another task).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Reaps a process that was signalled, and records its last counters.
    pub async fn reap(&mut self, last: Option<NodeStats>) {
        if let Some(mut child) = self.child.take() {
            // The process was signalled; waiting only reaps it, and cannot fail but for a
            // child already reaped, which leaves nothing to do.
            let _ = tokio::task::spawn_blocking(move || child.wait()).await;
        }
        self.past.extend(last);
    }

    /// SIGTERM, wait for the drain, record the counters.
    pub async fn stop(&mut self) -> Result<(), ScenarioError> {
        let last = self.stats().await.ok();
        if let Some(pid) = self.pid() {
            signal(pid, rustix::process::Signal::TERM);
        }
        self.reap(last).await;
        Ok(())
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `/api/stats` of the running process.
    pub async fn stats(&self) -> Result<NodeStats, ScenarioError> {
        http::stats(self.http).await.map_err(|why| self.fail(why))
    }

    /// `/healthz` of the running process answers.
    pub async fn healthy(&self) -> bool {
        http::get(self.http, "/healthz").await.is_ok()
    }

    /// The last lines of the node's log, for error messages and the report.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Lines of the node's log containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends `sig` to `pid` (a node this harness started).
pub fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<SocketAddr, ScenarioError> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(ScenarioError::io("find a free port"))?;
    listener
        .local_addr()
        .map_err(ScenarioError::io("find a free port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_NODES: &str = r#"
name = "t"
[cluster]
nodes = 2
engines_per_node = 1
pool = "16MiB"
fabric = true
[workload]
kind = "synthetic"
generator = "shared_prompt"
seed = 1
requests = 1
"#;

    #[tokio::test]
    async fn every_node_seeds_from_the_others_at_their_advertised_address() {
        let text = format!(
            "{TWO_NODES}\n[[faults]]\nat_ms = 1\nkind = \"drop_link\"\nnode = 1\nduration_ms = 1\n"
        );
        let scenario = Scenario::parse(&text, Path::new(".")).expect("scenario");
        let plan = FabricPlan::new(&scenario)
            .await
            .expect("plan")
            .expect("fabric on");
        let proxy = plan.proxies[1]
            .as_ref()
            .expect("node 1 is faulted")
            .public_addr();
        assert!(plan.proxies[0].is_none(), "node 0 needs no proxy");
        assert_ne!(proxy, plan.listen[1]);

        let zero = plan.config(0);
        assert!(zero.contains(&format!("seeds = [\"{proxy}\"]")), "{zero}");
        assert!(
            zero.contains(&format!("advertise = \"{}\"", plan.listen[0])),
            "{zero}"
        );
        let one = plan.config(1);
        assert!(
            one.contains(&format!("listen = \"{}\"", plan.listen[1])),
            "{one}"
        );
        assert!(one.contains(&format!("advertise = \"{proxy}\"")), "{one}");
        assert!(
            one.contains(&format!("seeds = [\"{}\"]", plan.listen[0])),
            "{one}"
        );
        assert!(one.contains(&format!("secret = \"{}\"", plan.secret)));
        assert!(zero.contains("gossip_interval_ms = 100"), "{zero}");
    }
}
