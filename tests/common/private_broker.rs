//! A private RabbitMQ node for tests that break the broker (alarms, restarts), on ports of its own
//! so the shared broker on 5672 is never touched. Started with Debian's `rabbitmq-server` under a
//! unique node name, with its data in a scratch folder; stopped when dropped.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct PrivateBroker {
    pub node: String,
    pub amqp_port: u16,
    pub management_port: u16,
    dist_port: u16,
    dir: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl PrivateBroker {
    /// Starts a node and waits until its AMQP and management ports answer (about 10-20 s). A node
    /// that does not come up (ports picked free may be taken meanwhile; six nodes booting on two
    /// cores) is stopped and one more is started on fresh ports: the node is the test's
    /// precondition, not what it checks.
    pub fn start() -> Self {
        let first = Self::prepare();
        let why = match first.try_launch() {
            Ok(()) => return first,
            Err(why) => why,
        };
        eprintln!(
            "private RabbitMQ {} did not start, trying a fresh node: {why}",
            first.node
        );
        drop(first);
        let second = Self::prepare();
        if let Err(why) = second.try_launch() {
            panic!(
                "private RabbitMQ {} did not start either: {why}",
                second.node
            );
        }
        second
    }

    /// A node's name, ports, configuration and data folder, not started yet.
    fn prepare() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let node = format!("warren-test-{}@localhost", &id[id.len() - 10..]);
        let dir = std::env::temp_dir().join(format!("warren-rabbit-{}", &id[id.len() - 10..]));
        std::fs::create_dir_all(&dir).expect("broker dir");
        // The server runs as the rabbitmq user.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let (amqp_port, management_port, dist_port) = (free_port(), free_port(), free_port());
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp_port}\nmanagement.tcp.port = {management_port}\nmanagement.tcp.ip = 127.0.0.1\n"
            ),
        )
        .expect("config");
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n").expect("plugins");
        Self {
            node,
            amqp_port,
            management_port,
            dist_port,
            dir,
        }
    }

    /// Starts this node's server (again, after [`PrivateBroker::kill9`]: same name, ports and
    /// data) and waits until its AMQP and management ports answer.
    pub fn launch(&self) {
        if let Err(why) = self.try_launch() {
            panic!("private RabbitMQ {} did not start: {why}", self.node);
        }
    }

    /// [`PrivateBroker::launch`], saying why it failed: the end of the node's log, which is
    /// deleted with the node.
    fn try_launch(&self) -> Result<(), String> {
        let dir = &self.dir;
        let status = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .status()
            .expect("rabbitmq-server is installed (tests/run brings it up)");
        if !status.success() {
            return Err(format!(
                "rabbitmq-server -detached failed{}",
                self.log_tail()
            ));
        }
        let until = Instant::now() + Duration::from_secs(90);
        while !(answers(self.amqp_port) && answers(self.management_port)) {
            if Instant::now() >= until {
                return Err(format!(
                    "ports {} and {} did not answer within 90 s{}",
                    self.amqp_port,
                    self.management_port,
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        // Ports picked free can be taken by another node booting meanwhile: then they answer for
        // that node while this one failed to listen and stopped. Only the node itself can say it
        // is up.
        let started = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "await_startup"])
            .output()
            .expect("rabbitmqctl");
        if !started.status.success() {
            return Err(format!(
                "ports {} and {} answer, but node {} is not running (another node holds them?): {}{}",
                self.amqp_port,
                self.management_port,
                self.node,
                String::from_utf8_lossy(&started.stderr)
                    .lines()
                    .next()
                    .unwrap_or_default(),
                self.log_tail()
            ));
        }
        Ok(())
    }

    /// The last lines of the node's log files, for a failure message.
    fn log_tail(&self) -> String {
        let mut tail = String::new();
        for entry in std::fs::read_dir(self.dir.join("log"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            tail.push_str(&format!("\n--- {} (last lines):\n", entry.path().display()));
            tail.push_str(&super::last_lines(&text, 15));
        }
        tail
    }

    /// Kills the node's Erlang VM with SIGKILL, as a crashed machine would stop it, and waits
    /// until its AMQP port no longer answers.
    pub fn kill9(&self) {
        let pid = self.pid().expect("the node's pid file");
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let until = Instant::now() + Duration::from_secs(30);
        while answers(self.amqp_port) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(self.dir.join("pid"));
    }

    /// Stops (`true`, SIGSTOP) or resumes (SIGCONT) the node's Erlang VM: its connections stay
    /// open but nothing is answered meanwhile, as on a machine that froze.
    pub fn freeze(&self, frozen: bool) {
        let signal = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        let pid = self.pid().expect("the node's pid file");
        nix::sys::signal::kill(pid, signal).expect("signal the node");
    }

    /// The node's Erlang VM, from the pid file it wrote at start.
    fn pid(&self) -> Option<nix::unistd::Pid> {
        let pid = std::fs::read_to_string(self.dir.join("pid")).ok()?;
        Some(nix::unistd::Pid::from_raw(pid.trim().parse().ok()?))
    }

    /// The AMQP URL of this node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The management API base URL of this node.
    pub fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }

    /// Runs `rabbitmqctl -n NODE ARGS...` and asserts it succeeded.
    pub fn ctl(&self, args: &[&str]) {
        let out = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output()
            .expect("rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Private nodes joined into one RabbitMQ cluster (`rabbitmqctl join_cluster`), for tests of
/// failover; stopped when dropped.
pub struct PrivateCluster {
    pub nodes: Vec<PrivateBroker>,
}

impl PrivateCluster {
    /// Starts `size` nodes side by side and joins the others to the first (about 30-60 s).
    pub fn start(size: usize) -> Self {
        let nodes: Vec<PrivateBroker> = std::thread::scope(|scope| {
            let starting: Vec<_> = (0..size)
                .map(|_| scope.spawn(PrivateBroker::start))
                .collect();
            starting
                .into_iter()
                .map(|h| h.join().expect("a node started"))
                .collect()
        });
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &first]);
            node.ctl(&["start_app"]);
        }
        let until = Instant::now() + Duration::from_secs(90);
        for node in &nodes {
            while !(answers(node.amqp_port) && answers(node.management_port)) {
                assert!(
                    Instant::now() < until,
                    "node {} did not come back",
                    node.node
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        Self { nodes }
    }

    /// The comma-separated AMQP URL of every node: the first in full, the others `host:port`.
    pub fn url(&self) -> String {
        // The others inherit the user, password and vhost of the first.
        let mut url = self.nodes[0].url();
        for node in &self.nodes[1..] {
            url += &format!(",127.0.0.1:{}", node.amqp_port);
        }
        url
    }

    /// The node called `name` (e.g. a queue's leader, as the management API names it).
    pub fn node(&self, name: &str) -> Option<&PrivateBroker> {
        self.nodes.iter().find(|n| n.node == name)
    }
}

fn answers(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // A node a failed test left frozen would not answer `stop`, and would stay behind.
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-n", &self.node, "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
