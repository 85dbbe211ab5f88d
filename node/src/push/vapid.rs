//! The node's VAPID key pair (RFC 8292): an ES256 (P-256) key created on first start
//! and kept in the data folder, readable by the node's user only.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::SecretKey;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;

/// The key file's name inside the data folder: the 32-byte private scalar, raw.
pub const VAPID_KEY_FILE: &str = "vapid.key";

/// The VAPID key pair. `Debug` shows the public key only.
pub struct VapidKeys {
    key: SigningKey,
    public: String,
}

impl std::fmt::Debug for VapidKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidKeys")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Why the key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VapidError {
    /// Reading or writing the key file failed.
    #[error("VAPID key file {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The file does not hold a P-256 private key.
    #[error("VAPID key file {path} does not hold a 32-byte P-256 private key")]
    Damaged {
        /// The file.
        path: String,
    },
}

impl VapidKeys {
    /// Loads the key from `dir`, or creates it (mode 0600) if there is none.
    pub fn load_or_create(dir: &Path) -> Result<VapidKeys, VapidError> {
        let path = dir.join(VAPID_KEY_FILE);
        let shown = path.display().to_string();
        let io = |source| VapidError::Io {
            path: shown.clone(),
            source,
        };
        let secret = match std::fs::read(&path) {
            Ok(bytes) => SecretKey::from_slice(&bytes)
                .ok()
                .filter(|_| bytes.len() == 32)
                .ok_or(VapidError::Damaged {
                    path: shown.clone(),
                })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = generate().map_err(io)?;
                write_private(dir, secret.to_bytes().as_slice()).map_err(io)?;
                tracing::info!(path = %shown, "created the VAPID key for push notifications");
                secret
            }
            Err(e) => return Err(io(e)),
        };
        let public = URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        Ok(VapidKeys {
            key: SigningKey::from(&secret),
            public,
        })
    }

    /// The public key, uncompressed (65 bytes), unpadded base64url: what browsers
    /// take as `applicationServerKey` and what push services check tokens against.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    /// The `Authorization` value for a push service at `origin` (scheme, host and
    /// port, as RFC 8292 asks for `aud`): `vapid t=<ES256 JWT>, k=<public key>`,
    /// the token valid for `validity` (at most 24 hours) and naming `contact`.
    /// The JWT is small enough to make here: header, claims, and a P-256 ECDSA
    /// signature (RFC 6979, so no randomness needed) as `r || s`.
    pub fn authorization(
        &self,
        origin: &str,
        contact: &str,
        validity: std::time::Duration,
    ) -> Result<String, String> {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| "the clock is before 1970".to_string())?
            .saturating_add(validity)
            .as_secs();
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({"aud": origin, "exp": exp, "sub": contact});
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let signed = format!("{header}.{claims}");
        let signature: Signature = self.key.sign(signed.as_bytes());
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        Ok(format!("vapid t={token}, k={}", self.public))
    }
}

/// A fresh private key from the system's random source.
fn generate() -> std::io::Result<SecretKey> {
    loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        // Out of range (zero, or at least the group order): vanishingly rare; draw again.
        if let Ok(secret) = SecretKey::from_slice(&bytes) {
            return Ok(secret);
        }
    }
}

/// Writes the key to a temporary file readable by the owner only, then renames it
/// into place, so a crash never leaves a half-written key behind.
fn write_private(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{VAPID_KEY_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, dir.join(VAPID_KEY_FILE))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_private_and_kept() {
        let dir = tempfile::tempdir().expect("dir");
        let first = VapidKeys::load_or_create(dir.path()).expect("create");
        let again = VapidKeys::load_or_create(dir.path()).expect("load");
        assert_eq!(first.public_key(), again.public_key());
        let raw = URL_SAFE_NO_PAD
            .decode(first.public_key())
            .expect("base64url");
        assert_eq!((raw.len(), raw[0]), (65, 4), "uncompressed P-256 point");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(VAPID_KEY_FILE))
                .expect("key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let secret = URL_SAFE_NO_PAD.encode(first.key.to_bytes());
        assert!(!format!("{first:?}").contains(&secret));
    }

    #[test]
    fn tokens_verify_against_the_public_key() {
        use p256::ecdsa::VerifyingKey;
        use p256::ecdsa::signature::Verifier;
        let dir = tempfile::tempdir().expect("dir");
        let keys = VapidKeys::load_or_create(dir.path()).expect("create");
        let value = keys
            .authorization(
                "https://push.example:8443",
                "mailto:ops@example.org",
                std::time::Duration::from_secs(3600),
            )
            .expect("token");
        let rest = value.strip_prefix("vapid t=").expect("scheme");
        let (token, key) = rest.split_once(", k=").expect("two parameters");
        assert_eq!(key, keys.public_key());
        let (signed, signature) = token.rsplit_once('.').expect("three parts");
        let signature =
            Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).expect("b64")).expect("sig");
        let public = URL_SAFE_NO_PAD.decode(key).expect("b64");
        VerifyingKey::from_sec1_bytes(&public)
            .expect("key")
            .verify(signed.as_bytes(), &signature)
            .expect("verifies");
        let claims = signed.split_once('.').expect("header.claims").1;
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).expect("b64")).expect("json");
        assert_eq!(claims["aud"], "https://push.example:8443");
        assert_eq!(claims["sub"], "mailto:ops@example.org");
    }

    #[test]
    fn a_damaged_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(VAPID_KEY_FILE), b"short").expect("write");
        assert!(VapidKeys::load_or_create(dir.path()).is_err());
    }
}
