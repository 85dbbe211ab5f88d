//! The node's identity: one ed25519 key, kept in its data folder, that is both its libp2p PeerId and its event-signing key.

use std::io::Write;
use std::path::Path;

use libp2p::PeerId;
use libp2p::identity::Keypair;

use crate::error::IdentityError;
use crate::signing::ServerKey;

/// The file name of the node key inside the data folder.
pub const KEY_FILE: &str = "node.key";

/// A node's key in both of its uses.
#[derive(Clone)]
pub struct NodeIdentity {
    /// Signs events and descriptors.
    pub key: ServerKey,
    /// The same key as libp2p sees it.
    pub keypair: Keypair,
    /// The libp2p peer id derived from it.
    pub peer_id: PeerId,
}

impl std::fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIdentity")
            .field("peer_id", &self.peer_id)
            .field("key_id", &self.key.key_id())
            .finish_non_exhaustive()
    }
}

impl NodeIdentity {
    /// The identity of a key.
    pub fn from_key(key: ServerKey) -> Result<Self, IdentityError> {
        // libp2p zeroizes the bytes it is given, so it gets a copy.
        let mut seed = *key.seed_bytes();
        let keypair = Keypair::ed25519_from_bytes(&mut seed)
            .map_err(|e| IdentityError::Key(e.to_string()))?;
        let peer_id = keypair.public().to_peer_id();
        Ok(NodeIdentity {
            key,
            keypair,
            peer_id,
        })
    }

    /// Loads the key from `dir/node.key`, or creates it (mode 0600) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let path = dir.join(KEY_FILE);
        let key = match std::fs::read(&path) {
            Ok(bytes) => {
                let seed: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    IdentityError::Key(format!(
                        "{} holds {} bytes, not a 32-byte ed25519 seed",
                        path.display(),
                        bytes.len()
                    ))
                })?;
                ServerKey::from_seed(&seed)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = ServerKey::generate().map_err(|e| IdentityError::Key(e.to_string()))?;
                write_private(&path, key.seed_bytes().as_slice())?;
                tracing::info!(path = %path.display(), "created the node key");
                key
            }
            Err(e) => return Err(IdentityError::Io(e)),
        };
        Self::from_key(key)
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_once_private_and_is_the_peer_identity() {
        let dir = tempfile::tempdir().expect("dir");
        let first = NodeIdentity::load_or_create(dir.path()).expect("create");
        let again = NodeIdentity::load_or_create(dir.path()).expect("load");
        assert_eq!(first.peer_id, again.peer_id);
        assert_eq!(first.key.public_key_base64(), again.key.public_key_base64());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("key file")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // The PeerId embeds the public key that verifies event signatures.
        let public = first.keypair.public().try_into_ed25519().expect("ed25519");
        assert_eq!(public.to_bytes(), first.key.verifying_key().to_bytes());
    }

    #[test]
    fn a_damaged_key_file_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join(KEY_FILE), b"short").expect("write");
        assert!(NodeIdentity::load_or_create(dir.path()).is_err());
    }
}
