//! The resource journal: a file in the bus directory recording who owns which resource
//! with what metadata and TTL, so a restarted broker gives resources back *with* their
//! metadata and expiry when their owners claim them again (the ids themselves come back
//! from the dead broker's registry, which the instances still map; see
//! `RegistryView::resources_owned_by_in_dead_registry`).
//!
//! Append-only frames (`u32` length, then the encoded [`Entry`]), buffered per control
//! request and written with one `write` before the request is answered: what a caller was
//! told is in the file even if the broker is SIGKILLed right after (the page cache
//! survives the process; the bus does not outlive the machine, so no fsync). A torn last
//! frame is ignored. On start the file is read, folded to one entry per id, and rewritten
//! compacted (temporary file and rename); it is compacted again when it grows.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aegis_client::proto::{self, ResourceMetadata};
use serde::{Deserialize, Serialize};

pub const FILE: &str = "resources.journal";

/// How long after a start the recovered entries wait for their owners to claim again, by
/// default (`--journal-recovery-ms`).
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(60);

/// Frames larger than this are corruption, not records.
const MAX_FRAME: usize = 1 << 20;

/// One resource's ownership as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    pub service: String,
    pub instance: String,
    pub metadata: ResourceMetadata,
    pub claimed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Entry {
    Own { id: String, owned: Owned },
    Drop { id: String },
}

pub struct Journal {
    path: PathBuf,
    file: Option<File>,
    buf: Vec<u8>,
    /// Bytes in the file since its last compaction.
    written: u64,
    /// Entries of the previous run not yet claimed again, and until when they wait.
    recovered: HashMap<String, Owned>,
    recovered_until: Instant,
    /// How long recovered entries wait (see [`RECOVERY_WINDOW`]).
    window: Duration,
}

impl Journal {
    /// Opens the journal in `dir`, reading what a previous run left.
    pub fn open(dir: &Path) -> Result<Journal, String> {
        Self::open_with(dir, RECOVERY_WINDOW)
    }

    /// As [`Journal::open`], with recovered entries waiting `window` for their owners.
    pub fn open_with(dir: &Path, window: Duration) -> Result<Journal, String> {
        let path = dir.join(FILE);
        let recovered = match open_nofollow(&path, false) {
            Ok(f) => {
                let mut f = crate::identities::trusted(f, &path)?;
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                fold(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        if !recovered.is_empty() {
            tracing::info!(
                resources = recovered.len(),
                "resource journal: metadata of the previous run waits for its owners"
            );
        }
        let mut j = Journal {
            path,
            file: None,
            buf: Vec::new(),
            written: 0,
            recovered,
            recovered_until: Instant::now() + window,
            window,
        };
        j.compact(std::iter::empty())?;
        Ok(j)
    }

    /// Appends an entry (written at the next [`Journal::flush`]).
    pub fn record(&mut self, e: &Entry) {
        match proto::encode(e) {
            Ok(b) => {
                self.buf.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.buf.extend_from_slice(&b);
            }
            Err(err) => tracing::error!("resource journal: cannot encode an entry: {err}"),
        }
    }

    /// Writes what was recorded since the last flush (one `write`).
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if let Some(f) = self.file.as_mut() {
            if let Err(e) = f.write_all(&self.buf) {
                tracing::error!(path = %self.path.display(), "resource journal: write failed: {e}");
            }
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
    }

    /// What the previous run journaled for `id`, if `service`/`instance` owned it then:
    /// taken (each entry is restored once).
    pub fn take_recovered(&mut self, id: &str, service: &str, instance: &str) -> Option<Owned> {
        match self.recovered.get(id) {
            Some(o) if o.service == service && o.instance == instance => self.recovered.remove(id),
            _ => None,
        }
    }

    /// Whether the file should be rewritten from the live state: it grew well past what
    /// the live entries need, or the recovery window closed with entries still waiting.
    pub fn wants_compaction(&mut self, live: usize) -> bool {
        if !self.recovered.is_empty() && Instant::now() >= self.recovered_until {
            tracing::info!(
                resources = self.recovered.len(),
                "resource journal: owners did not claim these again within {:?}; forgetting them",
                self.window
            );
            self.recovered.clear();
            return true;
        }
        self.written > (1 << 20).max(live as u64 * 1024)
    }

    /// Rewrites the file as `live` (plus the recovered entries still waiting).
    pub fn compact(&mut self, live: impl Iterator<Item = Entry>) -> Result<(), String> {
        self.flush();
        let tmp = self.path.with_extension("journal.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = open_nofollow(&tmp, true)
            .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let waiting: Vec<Entry> = self
            .recovered
            .iter()
            .map(|(id, o)| Entry::Own {
                id: id.clone(),
                owned: o.clone(),
            })
            .collect();
        for e in waiting.into_iter().chain(live) {
            self.record(&e);
        }
        f.write_all(&self.buf)
            .and_then(|()| std::fs::rename(&tmp, &self.path))
            .map_err(|e| format!("cannot write {}: {e}", self.path.display()))?;
        self.buf.clear();
        self.written = 0;
        self.file = Some(f);
        Ok(())
    }
}

fn open_nofollow(path: &Path, create: bool) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    if create {
        o.create_new(true).append(true).mode(0o600);
    } else {
        o.read(true);
    }
    o.custom_flags(libc::O_NOFOLLOW).open(path)
}

/// One entry per id from the frames in `bytes`; stops at the first torn or bad frame.
fn fold(bytes: &[u8]) -> HashMap<String, Owned> {
    let mut out = HashMap::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        if len > MAX_FRAME || rest.len() < 4 + len {
            break;
        }
        match proto::decode::<Entry>(&rest[4..4 + len]) {
            Ok(Entry::Own { id, owned }) => {
                out.insert(id, owned);
            }
            Ok(Entry::Drop { id }) => {
                out.remove(&id);
            }
            Err(_) => break,
        }
        rest = &rest[4 + len..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(svc: &str) -> Owned {
        Owned {
            service: svc.into(),
            instance: "i".into(),
            metadata: ResourceMetadata {
                tags: vec!["t".into()],
                ttl_ms: Some(5),
                ..Default::default()
            },
            claimed_at_ms: 1,
            expires_at_ms: Some(6),
        }
    }

    #[test]
    fn a_restart_recovers_the_last_word_on_each_id_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.record(&Entry::Own {
            id: "a".into(),
            owned: own("s"),
        });
        j.record(&Entry::Own {
            id: "b".into(),
            owned: own("s"),
        });
        j.record(&Entry::Drop { id: "a".into() });
        j.flush();
        drop(j);
        // A torn frame at the end (the broker died mid-write).
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE))
            .unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let mut j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.take_recovered("a", "s", "i"), None);
        assert_eq!(
            j.take_recovered("b", "other", "i"),
            None,
            "another owner gets nothing"
        );
        assert_eq!(j.take_recovered("b", "s", "i"), Some(own("s")));
        assert_eq!(j.take_recovered("b", "s", "i"), None, "restored once");
    }
}
