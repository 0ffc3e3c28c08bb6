//! Identities that are never reused on one bus directory, not even across broker restarts.
//!
//! Processes cache what they mapped by identity: an instance keeps a caller's client
//! segment under `(index, generation)`, a caller keeps an instance's ring under `(index,
//! incarnation)`. Processes outlive a broker, so after a restart a fresh process must never
//! be given an identity a process of the previous run still goes by: a cache would then
//! hand one process's memory to another (a reply into the wrong mailbox, a request into the
//! wrong ring). Generations and incarnations therefore come from counters that continue
//! from where the previous broker left them, kept in the file [`FILE`] in the bus
//! directory. The broker reserves them in blocks of [`BLOCK`] and writes the end of the
//! block before handing out its first number, so a broker killed at any point has never
//! used a number past what the file says.
//!
//! Everything a broker hands out is at or above the floor it read at start; an identity a
//! resuming process brings is honoured only if it is below that floor (it can only be from
//! an earlier run).

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The counters' file in the bus directory: `<next client generation> <next incarnation>`.
pub const FILE: &str = "identities";
/// How many numbers of each counter one write of the file reserves.
pub const BLOCK: u64 = 4096;

pub struct Identities {
    file: Option<(File, PathBuf)>,
    /// What the previous runs may have used: everything below is theirs.
    floor_gen: u32,
    floor_incarnation: u64,
    next_gen: u32,
    next_incarnation: u64,
    /// Ends of the reserved blocks (the values in the file).
    reserved_gen: u32,
    reserved_incarnation: u64,
}

impl Identities {
    /// Continues the counters of `dir`'s previous brokers. A missing file starts at 1; an
    /// unreadable one is an error naming it (starting over could reuse identities that
    /// live processes still hold).
    pub fn load(dir: &Path) -> Result<Identities, String> {
        let path = dir.join(FILE);
        let mut file = open_bus_file(&path)?;
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let (gen, incarnation) = parse(&text).ok_or_else(|| {
            format!(
                "{} holds {:?}, not '<generation> <incarnation>'; remove it only when no \
                 process of this bus is left",
                path.display(),
                text.trim()
            )
        })?;
        let mut ids = Identities::starting_at(gen, incarnation);
        ids.file = Some((file, path));
        ids.reserve()?;
        Ok(ids)
    }

    /// Counters that start at the given floors and are not persisted (unit tests).
    pub fn starting_at(gen: u32, incarnation: u64) -> Identities {
        let gen = gen.max(1);
        let incarnation = incarnation.max(1);
        Identities {
            file: None,
            floor_gen: gen,
            floor_incarnation: incarnation,
            next_gen: gen,
            next_incarnation: incarnation,
            reserved_gen: gen,
            reserved_incarnation: incarnation,
        }
    }

    /// Whether a resuming process's generation can be from an earlier broker run.
    pub fn is_earlier_gen(&self, gen: u32) -> bool {
        gen != 0 && gen < self.floor_gen
    }

    /// Whether a re-registering instance's incarnation can be from an earlier broker run.
    pub fn is_earlier_incarnation(&self, incarnation: u64) -> bool {
        incarnation != 0 && incarnation < self.floor_incarnation
    }

    pub fn client_gen(&mut self) -> Result<u32, String> {
        if self.next_gen >= self.reserved_gen {
            self.reserve()?;
        }
        let g = self.next_gen;
        self.next_gen += 1;
        Ok(g)
    }

    pub fn incarnation(&mut self) -> Result<u64, String> {
        if self.next_incarnation >= self.reserved_incarnation {
            self.reserve()?;
        }
        let i = self.next_incarnation;
        self.next_incarnation += 1;
        Ok(i)
    }

    /// Moves both reservations one block past what is in use and records them.
    fn reserve(&mut self) -> Result<(), String> {
        let gen = u32::try_from(u64::from(self.next_gen) + BLOCK).map_err(|_| {
            "client generations of this bus directory are used up (4 billion connections); \
             restart every process of the bus and remove the identities file"
                .to_string()
        })?;
        let incarnation = self.next_incarnation + BLOCK;
        if let Some((file, path)) = &mut self.file {
            // Fixed width, one write at offset 0: the file is never seen empty or half
            // replaced, even by a broker killed right here.
            let line = format!("{gen:>10} {incarnation:>20}\n");
            file.write_all_at(line.as_bytes(), 0)
                .and_then(|()| file.sync_data())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        self.reserved_gen = gen;
        self.reserved_incarnation = incarnation;
        Ok(())
    }
}

/// Opens (creating, never truncating) one of the broker's files in the bus directory for
/// reading and writing; the error names the file.
pub(crate) fn open_bus_file(path: &Path) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        // Never through a symlink someone planted in the directory.
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
        .and_then(|f| trusted(f, path))
}

/// `f` if only the broker's uid could have written it (its owner, and not writable by
/// group or others), else an error naming the file and why: a file someone else could
/// write (in a directory shared with `--allow-shared-dir`) is not trusted with the bus's
/// identities or its resource journal.
pub(crate) fn trusted(f: File, path: &Path) -> Result<File, String> {
    use std::os::unix::fs::MetadataExt;
    let m = f
        .metadata()
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != me {
        return Err(format!(
            "{} is owned by uid {}, not the broker's uid {me}: not trusted (remove it if no \
             process of this bus is left)",
            path.display(),
            m.uid()
        ));
    }
    if m.mode() & 0o022 != 0 {
        return Err(format!(
            "{} has mode {:o}: others could have written it, so it is not trusted (chmod 600)",
            path.display(),
            m.mode() & 0o777
        ));
    }
    Ok(f)
}

fn parse(text: &str) -> Option<(u32, u64)> {
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (None, ..) => Some((1, 1)),
        (Some(g), Some(i), None) => Some((g.parse().ok()?, i.parse().ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_later_run_hands_out_only_numbers_no_earlier_run_could_have() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = Identities::load(dir.path()).unwrap();
        let gens: Vec<u32> = (0..10).map(|_| first.client_gen().unwrap()).collect();
        let incs: Vec<u64> = (0..10).map(|_| first.incarnation().unwrap()).collect();
        assert_eq!(gens, (1..=10).collect::<Vec<_>>());
        assert_eq!(incs, (1..=10).collect::<Vec<_>>());
        // Killed without a word: the next run starts past the whole reserved block.
        drop(first);
        let mut second = Identities::load(dir.path()).unwrap();
        let g = second.client_gen().unwrap();
        let i = second.incarnation().unwrap();
        assert!(g > 10 && i > 10, "reused: gen {g}, incarnation {i}");
        assert!(gens.iter().all(|&x| second.is_earlier_gen(x)));
        assert!(incs.iter().all(|&x| second.is_earlier_incarnation(x)));
        assert!(!second.is_earlier_gen(g) && !second.is_earlier_incarnation(i));
        assert!(!second.is_earlier_gen(0) && !second.is_earlier_incarnation(0));
    }

    #[test]
    fn running_past_a_block_reserves_the_next_one_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut ids = Identities::load(dir.path()).unwrap();
        let mut last = 0;
        for _ in 0..BLOCK + 5 {
            last = ids.client_gen().unwrap();
        }
        let on_disk = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        let (g, _) = parse(&on_disk).unwrap();
        assert!(g > last, "file says {g} but {last} is in use");
        drop(ids);
        let mut next = Identities::load(dir.path()).unwrap();
        assert!(next.client_gen().unwrap() > last);
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        let e = Identities::load(dir.path()).err().unwrap();
        assert!(e.contains(FILE) && e.contains("garbage"), "{e}");
    }
}
