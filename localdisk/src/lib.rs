//! The client host's small local disk (DESIGN.md §5): a block device or a file holding
//!
//! - a [`superblock`]: what `hi mount DISK` needs to find its hive and volume (never a
//!   credential: the token is kept in a root-only file beside the config), and where the
//!   regions below lie;
//! - the [`journal`], the NVRAM of the design: one ordered log of everything written on
//!   this host and not yet committed to the hive, with two control slots that say where
//!   the log starts;
//! - the [`cache`]: verified chunk plaintext by id, so data read once stays local across
//!   remounts.
//!
//! The state machines around the journal live here too, without I/O, so `hi` and the
//! client simulator run the same code: the [`book`] (which records are still needed, how
//! far the head may move, which records done out of order a `Done` record must name) and
//! [`replay`] (record payloads, and the order in which recovered records are applied).
//!
//! All I/O goes through a [`hivefs_nvme::BlockDevice`], so the same code runs on io_uring
//! over `O_DIRECT` in `hi` and on the seeded [`hivefs_nvme::SimDevice`] in the simulator
//! (torn and lost writes at a crash).
//!
//! Layout (every offset a multiple of 4 KiB):
//!
//! ```text
//! block 0          superblock
//! blocks 1, 2      journal control slots (written alternately; the valid one with the
//!                  higher counter wins)
//! journal region   circular log of records (journal.rs)
//! cache region     chunk cache
//! ```

pub mod book;
pub mod cache;
pub mod journal;
pub mod ranges;
pub mod replay;
pub mod superblock;

pub use book::Book;
pub use cache::{CacheStats, DiskCache};
pub use journal::{Journal, JournalError, Record, RecordKind, Recovered};
pub use superblock::{Layout, Superblock, SuperblockError};
