//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, libfuzzer-sys) and for the
//! stable test that replays their checked-in corpora (`tests/fuzz_corpus.rs`): each takes
//! arbitrary bytes and must neither panic nor hang, whatever they are.
//!
//! * [`control_frame`]: the broker's control-frame decoder (length prefix, then a
//!   bincode-encoded `Request`), and the client's for responses.
//! * [`segment_open`]: a memfd holding the bytes (size-sealed, as every segment must be)
//!   opened as each kind of segment, and on success read the way peers read them.
//! * [`request_header`]: an instance's checks on a request header from a ring slot.

use std::os::fd::OwnedFd;

use crate::serve::instance;
use crate::session::proto;
use crate::shm::layout::{
    ChannelSeg, ClientSeg, InstanceSeg, Mapping, MsgHeader, Party, RegistryView, SegmentHeader,
    SegmentKind, SharedView,
};
use crate::shm::sys;

/// A control frame as the broker reads one off its socket.
pub fn control_frame(data: &[u8]) {
    let Some((hdr, body)) = data.split_first_chunk::<4>() else {
        return;
    };
    let Ok(len) = proto::frame_len(*hdr) else {
        return;
    };
    let body = &body[..len.min(body.len())];
    if let Ok(req) = proto::decode::<proto::Request>(body) {
        // Whatever decodes must encode again (the broker echoes parts of it in errors).
        let again = proto::encode(&req).expect("a decoded request encodes");
        assert!(proto::decode::<proto::Request>(&again).is_ok());
    }
    let _ = proto::decode::<proto::Response>(body);
}

/// The bytes as a segment: the file is as long as the header claims (when that is
/// reasonable), so the fuzzer can reach past the size check into each layout's own checks.
pub fn segment_open(data: &[u8]) {
    let claimed = (data.len() >= size_of::<SegmentHeader>())
        .then(|| {
            // SAFETY: at least a header's worth of bytes; read unaligned into a plain copy.
            unsafe { std::ptr::read_unaligned(data.as_ptr() as *const SegmentHeader) }.total_size
        })
        .filter(|&s| s <= 1 << 22 && s as usize >= data.len())
        .unwrap_or(data.len() as u64);
    let Ok(fd) = sys::memfd("aegis-fuzz", claimed) else {
        return;
    };
    if write_all(&fd, data).is_err() || sys::seal_size(&fd).is_err() {
        return;
    }
    for kind in [
        SegmentKind::Registry,
        SegmentKind::Shared,
        SegmentKind::Instance,
        SegmentKind::Client,
        SegmentKind::Caller,
        SegmentKind::Channel,
        SegmentKind::Reply,
    ] {
        let Ok((_, h)) = Mapping::open(&fd, kind, true, None) else {
            continue;
        };
        match kind {
            SegmentKind::Registry => read_registry(&fd),
            SegmentKind::Shared => {
                if let Ok(s) = SharedView::open(&fd, h.params[0] as u32) {
                    let _ = s.spin_seats().len();
                }
            }
            SegmentKind::Instance => {
                // With an own segment of the reply heap the ring states (when small enough
                // to make here).
                let own = (h.params[1] <= 1 << 22)
                    .then(|| InstanceSeg::create_own(h.bus_epoch, h.params[1]).ok())
                    .flatten();
                if let Some((_, own)) = own {
                    if let Ok(seg) =
                        InstanceSeg::open(&fd, own, h.bus_epoch, h.params[3] as u32, h.params[2])
                    {
                        let _ = crate::channel::ring::Doorbell(seg.ring_indices()).take();
                    }
                }
            }
            SegmentKind::Channel => {
                // As its instance reads it: with a fresh reply side of the same channel.
                let Ok([_, rep]) = ChannelSeg::create_like(h.bus_epoch, h.params) else {
                    continue;
                };
                if let Ok(ch) = ChannelSeg::open(&fd, &rep, h.bus_epoch, None, Party::Instance) {
                    read_ring(ch.ring());
                    for i in [0, 1, ch.mailboxes.mailboxes.saturating_sub(1), u32::MAX] {
                        if let Some((mb, _)) = ch.mailbox(i) {
                            let _ = crate::channel::mailbox::take(mb, 1, 0);
                            let _ = crate::channel::mailbox::still_unread(mb, 1);
                        }
                    }
                }
            }
            SegmentKind::Reply => {
                // As its caller reads it: with a fresh request side of the same channel.
                let Ok([req, _]) = ChannelSeg::create_like(h.bus_epoch, h.params) else {
                    continue;
                };
                if let Ok(ch) = ChannelSeg::open(&req, &fd, h.bus_epoch, None, Party::Caller) {
                    let _ = ch.taken_up();
                    for _ in 0..ch.ring().capacity() + 1 {
                        // Claimed and dropped: published as aborted.
                        let _ = ch.ring().try_claim();
                    }
                    for i in [0, 1, ch.mailboxes.mailboxes.saturating_sub(1), u32::MAX] {
                        if let Some((mb, _)) = ch.mailbox(i) {
                            crate::channel::mailbox::arm(mb, 1, 0);
                            let _ = crate::channel::mailbox::still_waiting(mb, 1);
                            let _ = crate::channel::mailbox::cancel(mb, 1);
                            let _ = crate::channel::mailbox::is_finished(mb, 1);
                            crate::channel::mailbox::release(mb, 1);
                        }
                    }
                }
            }
            SegmentKind::InstanceOwn => unreachable!("opened below, sealed read-only"),
            SegmentKind::Heap => {
                // As its reader opens it (read-only, once sealed against writers): an
                // instance a request heap, a caller a reply heap.
                let _ = sys::seal_read_only(&fd);
                let side = if h.params[2] == 1 {
                    crate::shm::layout::HeapSide::Reply
                } else {
                    crate::shm::layout::HeapSide::Request
                };
                if let Ok(heap) =
                    crate::shm::layout::ChannelHeap::open(&fd, h.bus_epoch, h.params[1], side)
                {
                    let _ = heap.range(u64::MAX - 1, 2);
                    let _ = heap.range(0, heap.size);
                    let _ = heap.range(heap.size, 1);
                }
            }
            SegmentKind::Caller => {
                if let Ok(c) = crate::shm::layout::CallerSeg::open(&fd, h.bus_epoch) {
                    for i in [0, c.services.saturating_sub(1), c.services, u32::MAX] {
                        let _ = c
                            .caller_stats(i)
                            .map(|s| s.breaker.load(std::sync::atomic::Ordering::Relaxed));
                    }
                }
            }
            SegmentKind::Client => {
                if let Ok(c) = ClientSeg::open(&fd, Some(h.bus_epoch), None) {
                    let _ = (c.layout.mailbox_stride(), c.index, c.gen);
                }
            }
        }
    }
    // The same bytes as an instance's own segment, which is opened only sealed read-only.
    let Ok(ro) = sys::memfd("aegis-fuzz-own", claimed) else {
        return;
    };
    if write_all(&ro, data).is_ok() && sys::seal_read_only(&ro).is_ok() {
        if let Ok((own, heap)) = InstanceSeg::open_own(&ro) {
            assert!(own.len() as u64 > heap);
        }
    }
}

fn read_registry(fd: &OwnedFd) {
    let Ok(r) = RegistryView::open(fd, false) else {
        return;
    };
    // Entries whose seqlock word is odd (a broker killed mid-write) are read only after
    // `SEQLOCK_STUCK` (100 ms; unit-tested in `layout`): skipped here, or the fuzzer
    // would spend its time waiting rather than trying inputs.
    let settled = |s: &crate::shm::layout::SeqLock| s.read_begin().is_some();
    for i in 0..r.layout.max_services.min(4) {
        if let Some(s) = r.service(i).filter(|s| settled(&s.seq)) {
            let _ = s.seq.read(|| s.name.load());
        }
    }
    for i in 0..r.layout.max_instances.min(4) {
        if let Some(e) = r.instance(i).filter(|e| settled(&e.seq)) {
            let _ = e.seq.read(|| e.id.load());
        }
    }
    if settled(&r.control().resources) {
        let _ = r.find_resource("doc-1");
    }
    let _ = r.resources_owned_by_in_dead_registry(&[(0, 0), (1, 1)]);
}

/// Takes what the ring holds the way a serving thread does, checking each header.
fn read_ring(ring: crate::channel::ring::RingRef<'_>) {
    for _ in 0..ring.capacity().min(64) {
        let Some(t) = ring.try_pop() else {
            break;
        };
        let h = t.header();
        if let Ok(shape) = instance::request_shape(&h, t.data_len(), 1 << 24) {
            let mut buf = vec![0u8; shape.method_len];
            assert!(t.read_into(0, &mut buf).is_some());
            if let instance::PayloadAt::Inline { off, len } = shape.payload {
                let mut out = Vec::new();
                assert!(t.copy_data(off, len, &mut out).is_some());
            }
        }
    }
}

/// A request header (the first 64 bytes, zero-padded) in a slot of `slot_data` bytes.
pub fn request_header(data: &[u8]) {
    let mut raw = [0u8; size_of::<MsgHeader>() + 10];
    let n = data.len().min(raw.len());
    raw[..n].copy_from_slice(&data[..n]);
    // SAFETY: MsgHeader is plain integers, valid for any bits; read unaligned from a copy.
    let h: MsgHeader = unsafe { std::ptr::read_unaligned(raw.as_ptr() as *const MsgHeader) };
    let tail = &raw[size_of::<MsgHeader>()..];
    let slot_data = u16::from_le_bytes([tail[0], tail[1]]) as usize;
    let max_message = u64::from_le_bytes(tail[2..10].try_into().expect("8 bytes"));
    if let Ok(s) = instance::request_shape(&h, slot_data, max_message) {
        assert!(s.method_len >= 1 && s.method_len <= slot_data);
        match s.payload {
            instance::PayloadAt::Inline { off, len } => {
                assert_eq!(off, s.method_len);
                assert!(off + len <= slot_data);
            }
            instance::PayloadAt::Heap { len, .. } => assert!(len <= max_message),
        }
    }
}

fn write_all(fd: &OwnedFd, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::from(fd.try_clone()?);
    f.write_all(data)
}
