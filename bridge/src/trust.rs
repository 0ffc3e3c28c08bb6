//! Who a bridge believes. With `trusted_hosts` set (host name → the public nkey of that
//! host's bridge), every announcement a bridge sends (`ipc.service.register`, heartbeat,
//! unregister) and every entry it writes to the resource bucket carries an ed25519
//! signature by its `signing_key_file`; an importing bridge takes an announcement only from
//! a trusted host, for an instance id of that host (`{id}@{host}`), with a valid signature,
//! and an ownership entry only when its host's signature holds. A rogue NATS client can then
//! announce nothing, squat no id and own no resource; it can still publish (what it sends
//! is ignored), and what it may subscribe to is NATS's permissions' business (see the
//! README's "More than one host").

use std::collections::BTreeMap;
use std::path::Path;

use nkeys::KeyPair;

/// This bridge's key and the keys it trusts.
pub struct Trust {
    signer: Option<KeyPair>,
    hosts: BTreeMap<String, KeyPair>,
    /// Take unsigned announcements (AegisIPC instances of the seed's SDK, which cannot
    /// sign) while checking the signed ones.
    pub accept_unsigned: bool,
}

impl Trust {
    /// No signatures made or checked (no `trusted_hosts`).
    pub fn open() -> Trust {
        Trust {
            signer: None,
            hosts: BTreeMap::new(),
            accept_unsigned: true,
        }
    }

    /// From the settings: the seed file (checked like a secret) and the trusted hosts.
    pub fn load(
        key_file: Option<&Path>,
        hosts: &BTreeMap<String, String>,
        accept_unsigned: bool,
    ) -> Result<Trust, String> {
        let signer = key_file.map(read_seed).transpose()?;
        let hosts = hosts
            .iter()
            .map(|(h, k)| {
                KeyPair::from_public_key(k)
                    .map(|kp| (h.clone(), kp))
                    .map_err(|e| format!("trusted_hosts.{h}: {k:?} is not a public nkey: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Trust {
            signer,
            hosts,
            accept_unsigned,
        })
    }

    /// Whether announcements and entries are checked.
    pub fn checking(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// This bridge's public key, if it signs.
    pub fn public_key(&self) -> Option<String> {
        self.signer.as_ref().map(KeyPair::public_key)
    }

    /// The signature of `fields` under `kind`, as hex; `None` without a key.
    pub fn sign(&self, kind: &str, fields: &[&str]) -> Option<String> {
        let kp = self.signer.as_ref()?;
        let sig = kp.sign(&canonical(kind, fields)).ok()?;
        Some(hex(&sig))
    }

    /// Whether `sig` is `host`'s signature of `fields` under `kind`. False for a host not
    /// trusted, a malformed signature or one that does not verify.
    pub fn verify(&self, host: &str, kind: &str, fields: &[&str], sig: &str) -> bool {
        let (Some(kp), Some(sig)) = (self.hosts.get(host), unhex(sig)) else {
            return false;
        };
        kp.verify(&canonical(kind, fields), &sig).is_ok()
    }
}

impl Trust {
    /// Whether `sig` holds for `host`: by this bridge's own key when `host` is `me`
    /// (ed25519 signatures are deterministic: signing again gives the same bytes), else as
    /// [`Trust::verify`].
    pub fn check(&self, me: &str, host: &str, kind: &str, fields: &[&str], sig: &str) -> bool {
        if host == me {
            return self.sign(kind, fields).is_some_and(|s| s == sig);
        }
        self.verify(host, kind, fields, sig)
    }
}

/// The bytes signed: the kind and the fields, each length-prefixed (no field can pass
/// for two).
fn canonical(kind: &str, fields: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in std::iter::once(&kind).chain(fields) {
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f.as_bytes());
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 256 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads an nkey seed from a file only the bridge's uid may read.
fn read_seed(path: &Path) -> Result<KeyPair, String> {
    use std::os::unix::fs::MetadataExt;
    let what = |e: String| format!("signing_key_file {}: {e}", path.display());
    let m = std::fs::metadata(path).map_err(|e| what(e.to_string()))?;
    let me = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| what(format!("cannot tell our uid: {e}")))?;
    if m.uid() != me || m.mode() & 0o077 != 0 {
        return Err(what(format!(
            "must belong to uid {me} with mode 0600 or 0400 (is uid {}, mode {:o})",
            m.uid(),
            m.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| what(e.to_string()))?;
    KeyPair::from_seed(text.trim()).map_err(|e| what(format!("not an nkey seed: {e}")))
}

/// Makes a new signing key: writes its seed to `path` (mode 0600, refusing to overwrite)
/// and returns its public key, for the other hosts' `trusted_hosts`.
pub fn new_key(path: &Path) -> Result<String, String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let kp = KeyPair::new_server();
    let seed = kp.seed().map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    writeln!(f, "{seed}").map_err(|e| e.to_string())?;
    Ok(kp.public_key())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_holds_for_its_host_and_fields_only() {
        let dir = tempfile::tempdir().unwrap();
        let (ka, kb) = (dir.path().join("a"), dir.path().join("b"));
        let (pa, pb) = (new_key(&ka).unwrap(), new_key(&kb).unwrap());
        let hosts: BTreeMap<String, String> = [("a".to_owned(), pa), ("b".to_owned(), pb)]
            .into_iter()
            .collect();
        let a = Trust::load(Some(&ka), &hosts, false).unwrap();
        let sig = a.sign("announce", &["svc", "i@a"]).unwrap();
        assert!(a.verify("a", "announce", &["svc", "i@a"], &sig));
        assert!(
            !a.verify("b", "announce", &["svc", "i@a"], &sig),
            "another host's key"
        );
        assert!(
            !a.verify("a", "announce", &["svc", "j@a"], &sig),
            "other fields"
        );
        assert!(
            !a.verify("a", "announce", &["svci@a", ""], &sig),
            "fields shifted"
        );
        assert!(
            !a.verify("a", "unregister", &["svc", "i@a"], &sig),
            "another kind"
        );
        assert!(
            !a.verify("c", "announce", &["svc", "i@a"], &sig),
            "an untrusted host"
        );
        assert!(!a.verify("a", "announce", &["svc", "i@a"], "zz"), "garbage");
        assert!(new_key(&ka).is_err(), "never overwrites a key");
    }
}
