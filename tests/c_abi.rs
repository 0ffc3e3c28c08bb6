//! The C ABI end to end: the library installed under a temporary prefix with
//! `scripts/install-c.sh`, the examples in `examples/c/` compiled with the system C compiler
//! against it (dynamically, statically, and under AddressSanitizer), run against the real
//! broker: a C instance with a Rust caller, a Rust instance with C callers.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use aegis_client::{CallOptions, Error};
use support::{wait_deadline, TestBus, DEADLINE};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The library, header and pkg-config files installed once per test process.
static PREFIX: OnceLock<tempfile::TempDir> = OnceLock::new();

/// Removes [`PREFIX`] when the test process exits: a static is never dropped, and each run
/// left its directory (and the C programs built in it) in the temporary directory.
extern "C" fn remove_prefix() {
    if let Some(dir) = PREFIX.get() {
        let _ = std::fs::remove_dir_all(dir.path());
    }
}

fn prefix() -> &'static Path {
    PREFIX
        .get_or_init(|| {
            let dir = tempfile::Builder::new()
                .prefix("aegis-c-")
                .tempdir()
                .unwrap();
            // SAFETY: registers a plain function without arguments; it runs at exit, when
            // the test threads are done with the directory.
            unsafe { libc::atexit(remove_prefix) };
            let release = support::aegisctl_bin()
                .parent()
                .is_some_and(|p| p.ends_with("release"));
            let st = Command::new(root().join("scripts/install-c.sh"))
                .arg(dir.path())
                .env("AEGIS_PROFILE", if release { "release" } else { "debug" })
                .env("AEGIS_CARGO_FLAGS", "--features aegis-client/test-hooks")
                .status()
                .unwrap();
            assert!(st.success(), "scripts/install-c.sh failed");
            dir
        })
        .path()
}

fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = support::succeed(
        Command::new("pkg-config")
            .args(args)
            .env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig")),
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
enum Link {
    Dynamic,
    Static,
    Asan,
}

/// Compiles C source `src` (C99, all warnings as errors) and links it as asked.
fn compile(src: &Path, link: Link) -> PathBuf {
    let name = format!(
        "{}-{}",
        src.file_stem().unwrap().to_string_lossy(),
        match link {
            Link::Dynamic => "dyn",
            Link::Static => "static",
            Link::Asan => "asan",
        }
    );
    let exe = prefix().join(name);
    let mut cc = Command::new("cc");
    cc.args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g"])
        .arg(src)
        .arg("-o")
        .arg(&exe);
    match link {
        Link::Dynamic => cc.args(pkg_config(&["--cflags", "--libs", "aegis-ipc"])),
        Link::Static => cc.args(pkg_config(&[
            "--static",
            "--cflags",
            "--libs",
            "aegis-ipc-static",
        ])),
        Link::Asan => cc
            .args(["-fsanitize=address", "-fno-omit-frame-pointer"])
            .args(pkg_config(&["--cflags", "--libs", "aegis-ipc"])),
    };
    let out = cc.output().expect("cc");
    assert!(
        out.status.success(),
        "compiling {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs a compiled C program against `bus` to its end: success, stdout, stderr.
fn run_c(exe: &Path, bus: &TestBus, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(exe)
        .args(args)
        .env("AEGIS_IPC_DIR", bus.path())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example(name: &str) -> PathBuf {
    root().join("examples/c").join(name)
}

/// Starts the C echo instance and waits for its "ready" line.
fn start_c_server(bus: &TestBus, exe: &Path, id: &str) -> support::Reaped {
    let mut c = Command::new(exe);
    c.args(["cecho", id])
        .env("AEGIS_IPC_DIR", bus.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = support::Reaped(c.spawn().unwrap());
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "C server said {line:?}");
    child
}

/// A C instance serves a Rust caller: replies, a handler error, and a clean exit on SIGTERM
/// (which unregisters it).
fn c_instance_with_rust_caller(link: Link) {
    let bus = TestBus::start();
    let exe = compile(&example("echo_server.c"), link);
    let server = start_c_server(&bus, &exe, "c1");
    let client = bus.connect();
    let opts = CallOptions::timeout(Duration::from_secs(10));
    let mut out = Vec::new();
    for i in 0..1000u32 {
        let p = i.to_le_bytes().repeat(256);
        let info = client
            .call_into("cecho", "echo", &p, &opts, &mut out)
            .unwrap();
        assert_eq!(out, p);
        assert_eq!(client.instance_id(info), "c1");
    }
    match client.call("cecho", "fail", b"", &opts) {
        Err(Error::Remote { code, message, .. }) => {
            assert_eq!(code, 418);
            assert_eq!(message, "asked to fail");
        }
        other => panic!("expected the handler's error, got {other:?}"),
    }
    let info = client.service("cecho").unwrap();
    assert_eq!(
        info.instances[0].metadata,
        vec![("lang".into(), "c".into())]
    );
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(server.id() as libc::pid_t, libc::SIGTERM) };
    let out = server.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "C server: {stderr}");
    assert!(!stderr.contains("Sanitizer"), "{stderr}");
    assert!(client.wait_until(DEADLINE, |c| c.routable_instances("cecho").is_empty()));
}

/// C callers (the example: 1,000 1 KiB calls and a handler error) against a Rust instance.
fn c_caller_with_rust_instance(link: Link) {
    let bus = TestBus::start();
    let exe = compile(&example("client.c"), link);
    let _inst = bus.serve("echo", "rust-1", &[]);
    // The example's "fail" method on an echo instance just echoes; its error path is shown
    // against the C server above.
    let (ok, stdout, stderr) = run_c(&exe, &bus, &["echo", "1000"]);
    assert!(ok, "C client: {stderr}");
    assert!(
        stdout.contains("1000 calls ok, last answered by rust-1"),
        "{stdout}"
    );
    assert!(!stderr.contains("Sanitizer"), "{stderr}");
}

#[test]
fn a_c_instance_serves_a_rust_caller_dynamically_linked() {
    c_instance_with_rust_caller(Link::Dynamic);
}

#[test]
fn a_c_instance_serves_a_rust_caller_statically_linked() {
    c_instance_with_rust_caller(Link::Static);
}

#[test]
fn a_c_caller_calls_a_rust_instance_dynamically_and_statically_linked() {
    c_caller_with_rust_instance(Link::Dynamic);
    c_caller_with_rust_instance(Link::Static);
}

#[test]
fn the_examples_run_clean_under_address_sanitizer() {
    c_instance_with_rust_caller(Link::Asan);
    c_caller_with_rust_instance(Link::Asan);
}

/// The header alone is enough to compile against, as strict C99 and as C++.
#[test]
fn the_header_compiles_as_strict_c99_and_as_cpp() {
    let src = prefix().join("only_header.c");
    std::fs::write(
        &src,
        "#include \"aegis_ipc.h\"\nint main(void) { return aegis_status_code(AEGIS_TIMEOUT) == 504 ? 0 : 1; }\n",
    )
    .unwrap();
    let inc = root().join("include");
    for (cc, lang) in [("cc", "-std=c99"), ("c++", "-std=c++11")] {
        let out = Command::new(cc)
            .args([
                lang,
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
            ])
            .arg("-I")
            .arg(&inc)
            .args(if cc == "c++" {
                vec!["-x", "c++"]
            } else {
                vec![]
            })
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cc}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A C caller SIGKILLed while its call is with the instance leaves the bus as a Rust one
/// would: the instance answers into nothing, other callers carry on, its slot is freed.
#[test]
fn a_c_caller_killed_mid_call_leaves_the_bus_healthy() {
    let bus = TestBus::start();
    let _slow = bus.serve("slow", "s", &["--delay-ms", "1000", "--threads", "2"]);
    let src = prefix().join("kill_me.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include "aegis_ipc.h"
int main(void) {
    aegis_bus *bus = NULL;
    uint8_t reply[64];
    size_t len = 0;
    if (aegis_connect(NULL, &bus) != AEGIS_OK) return 1;
    printf("calling\n");
    fflush(stdout);
    return (int)aegis_call(bus, "slow", "m", (const uint8_t *)"x", 1, NULL, reply, sizeof reply, &len);
}
"#,
    )
    .unwrap();
    let exe = compile(&src, Link::Dynamic);
    let mut c = Command::new(exe)
        .env("AEGIS_IPC_DIR", bus.path())
        .stdout(Stdio::piped())
        .spawn()
        .map(support::Reaped)
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "calling");
    let client = bus.connect();
    // Its request is in the ring or being handled (1 s): kill the caller meanwhile.
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
    wait_deadline(&mut c);
    for i in 0..3u8 {
        let r = client
            .call(
                "slow",
                "m",
                &[i],
                &CallOptions::timeout(Duration::from_secs(10)),
            )
            .unwrap();
        assert_eq!(r.payload, [i]);
    }
    // The broker freed the dead caller's slot: a new connection works.
    drop(bus.connect());
}

/// `aegis_try_submit` for event loops: a full ring answers `AEGIS_NOT_READY` at once (no
/// handle), past the call's deadline `AEGIS_TIMEOUT`; the calls that fit are answered once
/// the instance moves again. The program resumes the stopped instance itself.
#[test]
fn a_c_event_loop_is_told_a_ring_is_full_instead_of_waiting() {
    let bus = TestBus::start();
    let inst = bus.serve("tight", "t-1", &["--slot-count", "4"]);
    let client = bus.connect();
    client
        .call("tight", "m", b"warm", &CallOptions::default())
        .unwrap();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGSTOP) };
    support::wait_for("the instance to stop", || support::is_stopped(inst.pid()));
    let src = prefix().join("try_submit.c");
    std::fs::write(
        &src,
        r#"#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "aegis_ipc.h"
#define CHECK(x) do { if (!(x)) { printf("failed: %s (line %d)\n", #x, __LINE__); return 1; } } while (0)
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    aegis_bus *bus = NULL;
    aegis_pending *p[4] = {0}, *more = (aegis_pending *)1;
    aegis_buffer buf = {0};
    if (argc != 2 || aegis_connect(NULL, &bus) != AEGIS_OK) return 1;
    for (int i = 0; i < 4; i++) {
        uint8_t b = (uint8_t)i;
        CHECK(aegis_try_submit(bus, "tight", "m", &b, 1, NULL, 0, &p[i]) == AEGIS_OK && p[i] != NULL);
    }
    double t = now();
    CHECK(aegis_try_submit(bus, "tight", "m", (const uint8_t *)"x", 1, NULL, 0, &more) == AEGIS_NOT_READY);
    CHECK(more == NULL);
    CHECK(now() - t < 1.0); /* told at once, not after the 5 s attempt deadline */
    /* The same call, 6 s after its first try: past its deadline. */
    CHECK(aegis_try_submit(bus, "tight", "m", (const uint8_t *)"x", 1, NULL, 6000000, &more) == AEGIS_TIMEOUT);
    CHECK(kill((pid_t)atoi(argv[1]), SIGCONT) == 0);
    for (int i = 0; i < 4; i++) {
        CHECK(aegis_pending_wait(p[i], &buf) == AEGIS_OK && buf.len == 1 && buf.data[0] == i);
        aegis_buffer_free(&buf);
        aegis_pending_free(p[i]);
    }
    aegis_bus_free(bus);
    printf("told, then answered\n");
    return 0;
}
"#,
    )
    .unwrap();
    let pid = inst.pid().to_string();
    let (ok, stdout, stderr) = run_c(&compile(&src, Link::Dynamic), &bus, &[&pid]);
    // SAFETY: kill(2) on our child (whatever the program did).
    unsafe { libc::kill(inst.pid() as libc::pid_t, libc::SIGCONT) };
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("told, then answered"), "{stdout}");
}

/// Bad input through the C ABI: NULL handles and pointers, non-UTF-8 names, a buffer too
/// small (the reply is kept and fetched after), listings and errors with their detail; the
/// process and the bus carry on.
#[test]
fn bad_input_through_the_c_abi_gets_clear_statuses() {
    let bus = TestBus::start();
    let _inst = bus.serve("echo", "rust-1", &[]);
    let src = prefix().join("bad_input.c");
    std::fs::write(
        &src,
        r#"#include <stdio.h>
#include <string.h>
#include "aegis_ipc.h"
#define CHECK(cond) do { if (!(cond)) { printf("FAILED line %d: %s\n", __LINE__, #cond); return 1; } } while (0)
int main(void) {
    aegis_bus *bus = NULL;
    uint8_t small[4], big[64];
    size_t len = 0, need = 0;
    char text[512];
    aegis_buffer buf = {0};
    const char bad_utf8[] = {'e', (char)0xff, 0};
    CHECK(aegis_connect(NULL, NULL) == AEGIS_NULL_ARGUMENT);
    CHECK(aegis_connect(NULL, &bus) == AEGIS_OK);
    CHECK(aegis_call(NULL, "echo", "m", NULL, 0, NULL, big, sizeof big, &len) == AEGIS_NULL_ARGUMENT);
    CHECK(aegis_last_error(text, sizeof text, NULL) == AEGIS_OK && strstr(text, "bus") != NULL);
    CHECK(aegis_call(bus, bad_utf8, "m", NULL, 0, NULL, big, sizeof big, &len) == AEGIS_INVALID_ARGUMENT);
    CHECK(aegis_call(bus, "echo", "m", NULL, 5, NULL, big, sizeof big, &len) == AEGIS_NULL_ARGUMENT);
    CHECK(aegis_call(bus, "bad name", "m", NULL, 0, NULL, big, sizeof big, &len) == AEGIS_BAD_REQUEST);
    CHECK(aegis_status_code(AEGIS_BAD_REQUEST) == 400);
    CHECK(aegis_call(bus, "nobody", "m", NULL, 0, NULL, big, sizeof big, &len) == AEGIS_NO_AVAILABLE_INSTANCE);
    CHECK(aegis_last_error(text, 4, &need) == AEGIS_BUFFER_TOO_SMALL && need > 4);
    CHECK(aegis_call_resource(bus, "doc-404", "m", NULL, 0, NULL, big, sizeof big, &len) == AEGIS_RESOURCE_NOT_FOUND);
    /* The reply does not fit: the status says so, the length needed is given, the reply is kept. */
    CHECK(aegis_call(bus, "echo", "m", (const uint8_t *)"0123456789", 10, NULL, small, sizeof small, &len) == AEGIS_BUFFER_TOO_SMALL);
    CHECK(len == 10);
    CHECK(aegis_last_reply(big, sizeof big, &len) == AEGIS_OK && len == 10 && memcmp(big, "0123456789", 10) == 0);
    CHECK(aegis_last_instance(bus, text, sizeof text, NULL) == AEGIS_OK && strcmp(text, "rust-1") == 0);
    CHECK(aegis_call_alloc(bus, "echo", "m", (const uint8_t *)"abc", 3, NULL, &buf) == AEGIS_OK && buf.len == 3);
    aegis_buffer_free(&buf);
    aegis_buffer_free(&buf); /* freed buffers are empty: a second free is harmless */
    aegis_buffer_free(NULL);
    CHECK(aegis_services(bus, &buf) == AEGIS_OK && strstr((const char *)buf.data, "\"echo\"") != NULL);
    aegis_buffer_free(&buf);
    aegis_call_options *o = aegis_call_options_new();
    CHECK(aegis_call_options_set_max_attempts(o, 0) == AEGIS_INVALID_ARGUMENT);
    CHECK(aegis_call_options_set_selection(o, 7, NULL) == AEGIS_INVALID_ARGUMENT);
    CHECK(aegis_call_options_set_selection(o, 2, "rust-1") == AEGIS_OK);
    CHECK(aegis_call(bus, "echo", "m", NULL, 0, o, big, sizeof big, &len) == AEGIS_OK && len == 0);
    aegis_call_options_free(o);
    aegis_call_options_free(NULL);
    aegis_pending *p = NULL;
    CHECK(aegis_submit(bus, "echo", "m", (const uint8_t *)"x", 1, NULL, &p) == AEGIS_OK);
    CHECK(aegis_pending_wait(p, &buf) == AEGIS_OK && buf.len == 1);
    aegis_buffer_free(&buf);
    CHECK(aegis_pending_wait(p, &buf) == AEGIS_INVALID_ARGUMENT); /* collected once */
    aegis_pending_free(p);
    aegis_pending_free(NULL);
    aegis_instance_free(NULL);
    aegis_receiver_free(NULL);
    aegis_bus_free(bus);
    aegis_bus_free(NULL);
    printf("all bad input refused\n");
    return 0;
}
"#,
    )
    .unwrap();
    for link in [Link::Dynamic, Link::Asan] {
        let (ok, stdout, stderr) = run_c(&compile(&src, link), &bus, &[]);
        assert!(ok, "{stdout}{stderr}");
        assert!(stdout.contains("all bad input refused"), "{stdout}");
    }
    // The bus is fine.
    assert_eq!(
        bus.connect()
            .call("echo", "m", b"ok", &CallOptions::default())
            .unwrap()
            .payload,
        b"ok"
    );
}

/// Issue 17's C items in one program (`tests/c/faces.c`), under AddressSanitizer too: any
/// int in `aegis_status_str`, `AEGIS_STOPPED` after `aegis_stop`, a reply over the maximum
/// refused at the responder, last-call state, hop-counted nested calls from C handlers, the
/// mailbox count as a connect option, a second handle refused, `aegis_watch`'s timeout.
#[test]
fn every_promise_of_the_c_header_holds() {
    let bus = TestBus::start();
    let _echo = bus.serve("echo", "rust-1", &[]);
    let _big = bus.serve("big", "r-1", &["--max-message", "1024"]);
    let src = root().join("tests/c/faces.c");
    for link in [Link::Dynamic, Link::Asan] {
        let (ok, stdout, stderr) = run_c(&compile(&src, link), &bus, &[]);
        assert!(ok, "{stdout}{stderr}");
        assert!(stdout.contains("all C faces hold"), "{stdout}");
        assert!(!stderr.contains("Sanitizer"), "{stderr}");
    }
}

/// Zero-copy loans through the C ABI (`tests/c/loans.c`), also under AddressSanitizer: a
/// loaned request answered with a loaned reply read in place, sizes from 0 bytes to 12 MiB,
/// every loan and view given back (a leak fails the third 12 MiB round), and the refusals.
#[test]
fn loans_work_through_the_c_abi() {
    let bus = TestBus::start();
    let src = root().join("tests/c/loans.c");
    for link in [Link::Dynamic, Link::Asan] {
        let (ok, stdout, stderr) = run_c(&compile(&src, link), &bus, &[]);
        assert!(ok, "{stdout}{stderr}");
        assert!(stdout.contains("all loan faces hold"), "{stdout}");
        assert!(!stderr.contains("Sanitizer"), "{stderr}");
    }
}
