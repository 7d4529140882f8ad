//! API keys and roles. Clients send `Authorization: Bearer <key>`; the service only knows each key's SHA-256
//! digest (keys are 256-bit random tokens, so a fast hash is enough), compares digests in constant time, and
//! never logs or echoes a key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// The background job: `pushMessage`, `giveConsent`.
    Ingest,
    /// Data scientists and dashboards: every query.
    Read,
    /// Everything, including erasure.
    Admin,
}

impl Role {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "ingest" => Some(Self::Ingest),
            "read" => Some(Self::Read),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The roles an operation accepts (admin is always accepted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    Ingest,
    Read,
    Admin,
}

impl Permission {
    pub fn allows(self, role: Role) -> bool {
        matches!(
            (self, role),
            (_, Role::Admin) | (Self::Ingest, Role::Ingest) | (Self::Read, Role::Read)
        )
    }
}

/// Who is calling, as established by the HTTP layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A valid key with this role.
    Key(Role),
    /// No keys are configured and the operator allowed open access: everything is allowed.
    Open,
}

impl Caller {
    pub fn may(self, permission: Permission) -> bool {
        match self {
            Self::Open => true,
            Self::Key(role) => permission.allows(role),
        }
    }
}

/// The SHA-256 digest of a key, as configured in `API_KEYS`.
pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// A fresh random key: `dak_` and 32 random bytes, base64url.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random source");
    format!("dak_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The configured keys: a role and a digest each.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ApiKeys(Vec<(Role, [u8; 32])>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Parses `ROLE:SHA256HEX` entries separated by commas or whitespace.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys = Vec::new();
        for entry in text.split([',', ' ', '\n', '\t']).filter(|e| !e.is_empty()) {
            let (role, hex_digest) = entry
                .split_once(':')
                .ok_or_else(|| format!("entry {entry:?} is not ROLE:SHA256HEX"))?;
            let role = Role::parse(role)
                .ok_or_else(|| format!("role {role:?} is not one of ingest, read, admin"))?;
            let mut digest = [0u8; 32];
            hex::decode_to_slice(hex_digest, &mut digest).map_err(|_| {
                format!(
                    "the digest of a {role} key is not 64 hex digits (make one with `dataapi hash-key`)"
                )
            })?;
            keys.push((role, digest));
        }
        Ok(Self(keys))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The role of `key`, if it is one of ours. Every configured digest is compared, in constant time, so the
    /// time taken says nothing about which key (or how much of one) matched.
    pub fn role_of(&self, key: &str) -> Option<Role> {
        self.identify(key).map(|(role, _)| role)
    }

    /// The role of `key` and its public id (the first 8 bytes of its digest: the start of its `API_KEYS`
    /// entry, never the key), if it is one of ours; one digest, compared as [`role_of`](Self::role_of) says.
    pub fn identify(&self, key: &str) -> Option<(Role, [u8; 8])> {
        let presented = digest(key);
        let mut found = None;
        for (role, expected) in &self.0 {
            if bool::from(presented.ct_eq(expected)) {
                found = Some(*role);
            }
        }
        let id = presented[..8].try_into().expect("8 of 32 bytes");
        found.map(|role| (role, id))
    }
}

impl ApiKeys {
    /// Reads a key file (`API_KEYS_FILE`): the entries of `API_KEYS`, separated by commas, spaces or
    /// lines; lines starting with `#` are comments. A file with no key is refused: it would open the
    /// service to everyone.
    pub fn read_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let entries: String = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        let keys = Self::parse(&entries)?;
        if keys.is_empty() {
            return Err(format!(
                "{} holds no key (a keyed service never becomes keyless while it runs)",
                path.display()
            ));
        }
        Ok(keys)
    }
}

/// The keys in force, shared by every request. With `API_KEYS_FILE` they can be replaced while the service
/// runs (on SIGHUP): keys listed in the file before and after a reload stay valid throughout, so a key is
/// rotated by adding the new one, moving clients over, then removing the old one.
#[derive(Clone, Debug, Default)]
pub struct KeyRing {
    keys: Arc<RwLock<Arc<ApiKeys>>>,
    file: Option<PathBuf>,
}

impl KeyRing {
    pub fn new(keys: ApiKeys, file: Option<PathBuf>) -> Self {
        Self {
            keys: Arc::new(RwLock::new(Arc::new(keys))),
            file,
        }
    }

    /// The keys in force now.
    pub fn current(&self) -> Arc<ApiKeys> {
        self.keys
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The file the keys are reloaded from, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Reads the file again. The keys in force change only if it holds a valid list of at least one key;
    /// otherwise they stay as they were, and the error says why. Returns how many keys are in force.
    pub fn reload(&self) -> Result<usize, String> {
        let Some(file) = &self.file else {
            return Err("no API_KEYS_FILE is configured".to_owned());
        };
        let keys = ApiKeys::read_file(file)?;
        let count = keys.len();
        *self
            .keys
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(keys);
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_recognised_by_their_digest_only() {
        let read_key = generate_key();
        let admin_key = generate_key();
        assert!(read_key.starts_with("dak_") && read_key.len() > 40);
        assert_ne!(read_key, admin_key);
        let config = format!(
            "read:{}, admin:{}",
            hex::encode(digest(&read_key)),
            hex::encode(digest(&admin_key))
        );
        let keys = ApiKeys::parse(&config).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys.role_of(&read_key), Some(Role::Read));
        assert_eq!(keys.role_of(&admin_key), Some(Role::Admin));
        assert_eq!(keys.role_of("dak_wrong"), None);
        assert_eq!(keys.role_of(""), None);
        assert!(!format!("{keys:?}").contains(&hex::encode(digest(&read_key))));
    }

    #[test]
    fn a_key_ring_reloads_only_a_valid_non_empty_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        let (old, new) = (generate_key(), generate_key());
        let entry = |role: &str, key: &str| format!("{role}:{}", hex::encode(digest(key)));
        std::fs::write(
            &file,
            format!("# rotated monthly\n{}\n", entry("read", &old)),
        )
        .unwrap();
        let ring = KeyRing::new(ApiKeys::read_file(&file).unwrap(), Some(file.clone()));
        assert_eq!(ring.current().role_of(&old), Some(Role::Read));
        // Both during the rotation, then the new one alone.
        std::fs::write(
            &file,
            format!("{}\n{}", entry("read", &old), entry("admin", &new)),
        )
        .unwrap();
        assert_eq!(ring.reload(), Ok(2));
        assert_eq!(ring.current().role_of(&old), Some(Role::Read));
        assert_eq!(ring.current().role_of(&new), Some(Role::Admin));
        std::fs::write(&file, entry("admin", &new)).unwrap();
        assert_eq!(ring.reload(), Ok(1));
        assert_eq!(ring.current().role_of(&old), None);
        // An empty, malformed or missing file changes nothing.
        for bad in ["", "# nothing\n", "read:nothex", "owner:00"] {
            std::fs::write(&file, bad).unwrap();
            assert!(ring.reload().is_err(), "{bad:?}");
            assert_eq!(ring.current().role_of(&new), Some(Role::Admin), "{bad:?}");
        }
        std::fs::remove_file(&file).unwrap();
        assert!(ring.reload().is_err());
        assert_eq!(ring.current().len(), 1);
    }

    #[test]
    fn malformed_key_lists_are_refused() {
        assert!(ApiKeys::parse("reader:00").is_err());
        assert!(ApiKeys::parse("read").is_err());
        assert!(ApiKeys::parse("read:xyz").is_err());
        assert!(ApiKeys::parse(&format!("read:{}", "0".repeat(63))).is_err());
        assert!(ApiKeys::parse("").unwrap().is_empty());
    }

    #[test]
    fn roles_grant_what_the_issue_says() {
        use Permission::*;
        let table = [
            (Role::Ingest, [true, false, false]),
            (Role::Read, [false, true, false]),
            (Role::Admin, [true, true, true]),
        ];
        for (role, expected) in table {
            let got = [Ingest, Read, Admin].map(|p| Caller::Key(role).may(p));
            assert_eq!(got, expected, "{role}");
        }
        assert!([Ingest, Read, Admin].iter().all(|p| Caller::Open.may(*p)));
    }
}
