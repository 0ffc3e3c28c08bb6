//! Replays the fuzz targets' checked-in corpora (`fuzz/corpus/<target>/`) through the same
//! entry points the fuzzers drive (`aegis_client::fuzzing`), so every `cargo test` runs
//! what fuzzing found interesting without a fuzzer or a nightly toolchain.
//! `cargo test --test fuzz_corpus -- --ignored write_seeds` (re)writes the seed inputs.

use std::path::{Path, PathBuf};

use aegis_client::fuzzing;
use aegis_client::layout::{
    ChannelHeap, ChannelSeg, ClientLayout, InstanceLayout, Mapping, MsgHeader, Party,
    RegistryLayout, SegmentKind, SharedLayout, PAYLOAD_INLINE,
};
use aegis_client::proto::{self, BulkOptions, Request, ResourceSpec, ServiceConfig};
use aegis_client::sys;

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn replay(target: &str, f: fn(&[u8])) {
    let dir = corpus(target);
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = e.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let t = std::time::Instant::now();
        let r = std::panic::catch_unwind(|| f(&data));
        if std::env::var_os("AEGIS_FUZZ_TIMING").is_some() {
            println!(
                "{:>8.1} ms {}",
                t.elapsed().as_secs_f64() * 1e3,
                path.display()
            );
        }
        assert!(r.is_ok(), "{target} panicked on {}", path.display());
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
    println!("{target}: replayed {n} inputs");
}

#[test]
fn control_frame_corpus() {
    replay("control_frame", fuzzing::control_frame);
}

#[test]
fn segment_open_corpus() {
    replay("segment_open", fuzzing::segment_open);
}

#[test]
fn request_header_corpus() {
    replay("request_header", fuzzing::request_header);
}

/// The seeds the fuzzers started from: valid frames, valid segments of each kind (an
/// instance ring holding a published request), valid and invalid request headers.
#[test]
#[ignore]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = corpus(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(format!("seed-{name}")), bytes).unwrap();
    };
    let requests = [
        Request::Hello {
            protocol: proto::PROTOCOL_VERSION,
            layout: aegis_client::layout::LAYOUT_VERSION,
            mailboxes: 64,
            resume: Some((1, 2)),
            secret: 7,
        },
        Request::Register {
            service: "echo".into(),
            instance_id: "a".into(),
            metadata: vec![("k".into(), "v".into())],
            config: ServiceConfig {
                slot_size: Some(256),
                slot_count: Some(8),
                max_message: None,
            },
            heartbeat: Default::default(),
            resume: None,
        },
        Request::ClaimResources {
            instance: 1,
            incarnation: 2,
            resources: vec![ResourceSpec::new("doc-1")],
            options: BulkOptions::default(),
        },
        Request::ChannelHeap { channel: 3 },
        Request::ReplyHeap {
            channel: 3,
            epoch: 4,
            token: [5, 6],
        },
        Request::OpenReplyHeap {
            channel: 3,
            epoch: 4,
            token: [5, 6],
        },
        Request::ClaimChannels {
            channels: vec![aegis_client::proto::PreviousChannel {
                instance: 0,
                incarnation: 1,
                channel: 3,
                token: [5, 6],
            }],
        },
        Request::PreviousRequestHeap { token: [5, 6] },
        Request::OpenRequestHeap {
            channel: 3,
            token: [5, 6],
        },
        Request::Grant {
            instances: vec![(1, 2), (3, 4)],
        },
    ];
    for (i, r) in requests.iter().enumerate() {
        write(
            "control_frame",
            &format!("req{i}"),
            &proto::frame(r).unwrap(),
        );
    }
    let image = |fd: &std::os::fd::OwnedFd| {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::fs::File::from(fd.try_clone().unwrap()), &mut v)
            .unwrap();
        v
    };
    let make = |kind: SegmentKind, size: usize, params: [u64; 4]| {
        let fd = sys::memfd("seed", size as u64).unwrap();
        Mapping::map(&fd, true)
            .unwrap()
            .write_header(kind, size as u64, 9, params);
        sys::seal_size(&fd).unwrap();
        fd
    };
    let il = InstanceLayout {
        slot_size: 256,
        slot_count: 4,
        heap_size: 4096,
    };
    let fd = make(SegmentKind::Instance, il.ring_size(), il.params(1, 2));
    write("segment_open", "instance", &image(&fd));
    // A channel with one request published (its request side) and taken (its reply side).
    let ml = ClientLayout {
        mailboxes: 4,
        mailbox_inline: 64,
    };
    let [req, rep] = ChannelSeg::create(9, ChannelSeg::layout_for(il), ml, 1, 2, 7).unwrap();
    let caller = ChannelSeg::open(&req, &rep, 9, Some((1, 2)), Party::Caller).unwrap();
    let instance = ChannelSeg::open(&req, &rep, 9, Some((1, 2)), Party::Instance).unwrap();
    let (mb, _) = caller.mailbox(1).unwrap();
    aegis_client::mailbox::arm(mb, 1, 1);
    let mut c = caller.ring().try_claim().unwrap();
    c.set_header(MsgHeader {
        method_len: 4,
        payload_len: 2,
        kind: PAYLOAD_INLINE,
        mailbox: 1,
        mailbox_gen: 1,
        nonce: 1,
        secret: 2,
        ..Default::default()
    });
    c.data()[..6].copy_from_slice(b"echohi");
    c.publish();
    write("segment_open", "channel", &image(&req));
    drop(instance.ring().try_pop().unwrap());
    let (mb, _) = instance.mailbox(1).unwrap();
    assert!(aegis_client::mailbox::take(mb, 1, 1));
    write("segment_open", "reply", &image(&rep));
    let cl = ClientLayout {
        mailboxes: 4,
        mailbox_inline: 64,
    };
    let fd = make(
        SegmentKind::Client,
        ClientLayout::client_size(),
        cl.params(3, 4),
    );
    write("segment_open", "client", &image(&fd));
    let fd = make(
        SegmentKind::Heap,
        ChannelHeap::seg_size(4096),
        [4096, 7, 0, 0],
    );
    write("segment_open", "heap", &image(&fd));
    let rl = RegistryLayout {
        max_services: 2,
        max_instances: 2,
        max_resources: 2,
    };
    let fd = make(SegmentKind::Registry, rl.total_size(), rl.params());
    write("segment_open", "registry", &image(&fd));
    let sl = SharedLayout { max_services: 2 };
    let fd = make(SegmentKind::Shared, sl.total_size(), sl.params());
    write("segment_open", "shared", &image(&fd));

    let header = |h: MsgHeader, slot: u16, max: u64| {
        let mut v = vec![0u8; size_of::<MsgHeader>()];
        // SAFETY: copying a plain-integer struct's bytes into a buffer of its size.
        unsafe { std::ptr::write_unaligned(v.as_mut_ptr() as *mut MsgHeader, h) };
        v.extend_from_slice(&slot.to_le_bytes());
        v.extend_from_slice(&max.to_le_bytes());
        v
    };
    let ok = MsgHeader {
        method_len: 4,
        payload_len: 10,
        kind: PAYLOAD_INLINE,
        ..Default::default()
    };
    write("request_header", "inline", &header(ok, 256, 1 << 20));
    let heap = MsgHeader {
        kind: aegis_client::layout::PAYLOAD_HEAP,
        payload_len: 1 << 30,
        heap_off: u64::MAX,
        ..ok
    };
    write("request_header", "heap", &header(heap, 256, 1 << 20));
}
