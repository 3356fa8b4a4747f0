//! API keys: generation, hashing, and the operator key file.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};

/// Prefix of every Refinery key, so leaked keys are recognisable by scanners.
const KEY_PREFIX: &str = "rfk_";

/// A new random key: 40 alphanumeric characters (≈238 bits) from the OS's CSPRNG.
pub fn generate_key() -> String {
    let body: String = rand::rngs::OsRng
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{body}")
}

/// SHA-256 of a key, hex. Keys are long random strings, so a fast hash is enough: there
/// is nothing to brute-force that is cheaper than guessing the key itself.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// What may be shown of a key later (its first characters), to tell keys apart.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(KEY_PREFIX.len() + 6).collect()
}

/// Reads the operator key from `path`, or generates a new one on first start (not saved
/// yet: [`save_operator_key`] writes it once the server is up). Returns the key and whether
/// it is new.
pub fn load_or_generate_operator_key(path: &Path) -> std::io::Result<(String, bool)> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let key = text.trim().to_string();
            if key.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{} is empty; delete it to have a new operator key generated",
                    path.display()
                )));
            }
            // Tighten a key file someone loosened.
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((generate_key(), true)),
        Err(e) => Err(e),
    }
}

/// Writes a new operator key to `path` (mode 0600); fails if the file exists.
pub fn save_operator_key(path: &Path, key: &str) -> std::io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{key}")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hash_stably() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with("rfk_") && a.len() == 44);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
    }

    #[test]
    fn operator_key_is_created_once_with_mode_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("operator.key");
        let (key, created) = load_or_generate_operator_key(&path).expect("generate");
        assert!(created);
        assert!(!path.exists(), "not saved before the server is up");
        save_operator_key(&path, &key).expect("save");
        assert!(save_operator_key(&path, &key).is_err(), "never overwritten");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, created) = load_or_generate_operator_key(&path).expect("read");
        assert!(!created);
        assert_eq!(key, again);
    }
}
