//! The key-value engine under the store: fjall keyspaces behind the few calls the store makes.
//!
//! A [`Tree`] is one keyspace (named after its key layout, as before); an
//! [`Atomic`] is a cross-keyspace write batch, which fjall applies all-or-nothing
//! and recovers all-or-nothing after a crash. Reads see every committed batch at
//! once. Nothing here is durable until [`Engine::persist`] (an fdatasync of the
//! journal), which the store's callers group-commit.

use std::ops::RangeBounds;
use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

use super::{StoreError, StoreResult};

/// Open table files kept at once. The node shares its open-file limit (20,000
/// here) with its connections, so the store keeps few; more tables just reopen.
const MAX_OPEN_TABLES: usize = 128;

/// Memory for unflushed writes per keyspace; past it fjall writes the memtable
/// out to a table in the background. Only the message path's few keyspaces fill.
const MEMTABLE_BYTES: u64 = 32 * 1024 * 1024;

/// Journal kept for crash recovery; past it fjall flushes memtables so the
/// journal can be dropped. This bounds the replay after a crash.
const JOURNAL_BYTES: u64 = 256 * 1024 * 1024;

/// Block cache for reads.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// One fjall database and its keyspaces.
#[derive(Clone)]
pub(super) struct Engine {
    db: Database,
}

impl Engine {
    /// Opens (or creates) the database in `dir`; `Locked` if another process has it.
    pub(super) fn open(dir: &Path) -> StoreResult<Engine> {
        let db = Database::builder(dir)
            .max_cached_files(Some(MAX_OPEN_TABLES))
            .max_journaling_size(JOURNAL_BYTES)
            .cache_size(CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => StoreError::Locked,
                other => StoreError::Engine(other),
            })?;
        Ok(Engine { db })
    }

    /// The keyspace `name`, created empty if new.
    pub(super) fn tree(&self, name: &'static str) -> StoreResult<Tree> {
        Ok(Tree {
            ks: self.keyspace(name)?,
        })
    }

    fn keyspace(&self, name: &str) -> StoreResult<Keyspace> {
        Ok(self.db.keyspace(name, || {
            KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
        })?)
    }

    /// A batch of writes that lands all at once.
    pub(super) fn atomic(&self) -> Atomic {
        Atomic {
            batch: self.db.batch(),
        }
    }

    /// Blocks until everything committed so far is on disk (fdatasync of the journal).
    pub(super) fn persist(&self) -> StoreResult<()> {
        self.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// Writes every memtable out to tables, so the next start has no journal to
    /// replay. For a graceful stop; blocks for as long as that takes.
    pub(super) fn checkpoint(&self) -> StoreResult<()> {
        self.persist()?;
        for name in self.db.list_keyspace_names() {
            self.keyspace(&name)?.rotate_memtable_and_wait()?;
        }
        Ok(())
    }
}

/// One keyspace.
#[derive(Clone)]
pub(super) struct Tree {
    ks: Keyspace,
}

/// A key and its value, as the engine hands them out.
pub(super) type Entry = (fjall::Slice, fjall::Slice);

fn entry(guard: fjall::Guard) -> StoreResult<Entry> {
    Ok(guard.into_inner()?)
}

impl Tree {
    pub(super) fn get(&self, key: impl AsRef<[u8]>) -> StoreResult<Option<fjall::Slice>> {
        Ok(self.ks.get(key.as_ref())?)
    }

    pub(super) fn contains_key(&self, key: impl AsRef<[u8]>) -> StoreResult<bool> {
        Ok(self.ks.contains_key(key.as_ref())?)
    }

    pub(super) fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> StoreResult<()> {
        self.ks.insert(key.as_ref(), value.as_ref())?;
        Ok(())
    }

    pub(super) fn remove(&self, key: impl AsRef<[u8]>) -> StoreResult<()> {
        self.ks.remove(key.as_ref())?;
        Ok(())
    }

    /// Every entry whose key starts with `prefix`, in key order (reversible).
    pub(super) fn scan_prefix<P: AsRef<[u8]>>(
        &self,
        prefix: P,
    ) -> impl DoubleEndedIterator<Item = StoreResult<Entry>> + use<P> {
        self.ks.prefix(prefix.as_ref()).map(entry)
    }

    /// Every entry with a key in `range`, in key order (reversible).
    pub(super) fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(
        &self,
        range: R,
    ) -> impl DoubleEndedIterator<Item = StoreResult<Entry>> + use<K, R> {
        self.ks.range(range).map(entry)
    }

    /// Every entry, in key order.
    pub(super) fn iter(&self) -> impl DoubleEndedIterator<Item = StoreResult<Entry>> + use<> {
        self.ks.iter().map(entry)
    }
}

/// Writes that land together: all of them or, after a crash, none.
pub(super) struct Atomic {
    batch: fjall::OwnedWriteBatch,
}

impl Atomic {
    pub(super) fn insert(&mut self, tree: &Tree, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) {
        self.batch.insert(&tree.ks, key.as_ref(), value.as_ref());
    }

    pub(super) fn remove(&mut self, tree: &Tree, key: impl AsRef<[u8]>) {
        self.batch.remove(&tree.ks, key.as_ref());
    }

    pub(super) fn commit(self) -> StoreResult<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        self.batch.commit()?;
        Ok(())
    }
}
