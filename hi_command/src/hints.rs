//! What `hi` answers from what it learned, instead of asking the hive again: each is a
//! question the kernel asks over and over (after almost every write, for every file
//! `ls -l` lists, after every namespace change), and each answer from the hive would cost
//! a metadata round trip.
//!
//! - [`XattrNames`]: the names of an inode's extended attributes.
//! - [`DirAttrs`]: a directory's attributes as the hive answered them with the change this
//!   mount just made to it.
//!
//! Coherence is the kernel attribute cache's (see `fs.rs` on TTLs): what is kept here is
//! dropped when this mount changes the inode, when the hive pushes an invalidation of it
//! (another mount changed it; `invalidate.rs` calls [`Hints::drop_inode`] before it tells
//! the kernel), all at once when pushed invalidations were lost, and is used for at most
//! the mount's TTL.
//!
//! # `XattrNames`
//! The kernel asks a FUSE filesystem for `security.capability` before **every** `write(2)`
//! to a file (`file_remove_privs`: a write must drop file capabilities); `ls -l` asks for
//! `security.selinux` and `system.posix_acl_access` of every file it lists; `cp -a`, `tar`
//! and `rsync -X` list every file's names. Almost always the answer is "none". So `hi`
//! keeps, per inode, the list of names the hive answered (a `ListXattr`, asked instead of
//! the first such `GetXattr`): a name not in the list is answered ENODATA here, and a
//! `listxattr` from the list, each without a round trip. Values are not kept: a name in
//! the list is read from the hive. Also dropped when the kernel forgets the inode.
//!
//! A query that was on its way while an entry was dropped does not put it back: every
//! drop bumps a generation, and an answer is remembered only if no drop happened since its
//! query began. At most [`MAX_ENTRIES`] inodes are kept (past it, the map starts over
//! empty), and no list longer than [`MAX_NAMES_BYTES`].
//!
//! # `DirAttrs`
//! After every create, unlink, mkdir, ... the kernel drops its copy of the parent
//! directory's attributes and asks for them again at the next path walk through it (it
//! checks permissions itself: `default_permissions`). A name change goes to the hive as
//! `MutateInDir`, whose answer carries the directory's attributes read after the change
//! applied; the next getattr of that directory is answered from them, once.
//!
//! An answer is kept only if no other change of that directory from this mount was in
//! flight at any time during its own (two answers racing back could otherwise leave the
//! older one here), and no invalidation of it arrived meanwhile: every change of an inode
//! by this mount goes through [`DirAttrs::begin`] and [`DirAttrs::end`].

use hivefs_net::meta::Attr;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The xattr the kernel asks for before every write.
pub const CAPABILITY: &[u8] = b"security.capability";
/// Names the kernel and common tools ask for on their own, nearly always absent: the
/// first `GetXattr` of one of these for an inode asks for its list of names instead.
pub const PROBED: [&[u8]; 4] = [
    CAPABILITY,
    b"security.selinux",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
];
/// Most inodes [`XattrNames`] remembers at once.
pub const MAX_ENTRIES: usize = 1 << 20;
/// Longest list of names (bytes of names) [`XattrNames`] keeps for one inode.
pub const MAX_NAMES_BYTES: usize = 4096;
/// Most directories [`DirAttrs`] keeps answers for (the last change in each directory
/// leaves one that no getattr may ever take; the kernel's forget drops it too).
pub const MAX_DIR_HINTS: usize = 1 << 16;

/// An inode's xattr names, as the hive listed them.
pub type Names = Arc<[Vec<u8>]>;

/// The names of inodes' extended attributes (module doc).
pub struct XattrNames {
    state: Mutex<State>,
    ttl: Duration,
}

#[derive(Default)]
struct State {
    /// Bumped by every drop.
    generation: u64,
    /// Inode -> its names, and when the hive said so.
    names: HashMap<u64, (Names, Instant)>,
}

/// Taken before a query; [`XattrNames::remember`] needs it.
#[derive(Clone, Copy, Debug)]
pub struct Ticket(u64);

impl XattrNames {
    /// Answers are used for at most `ttl`.
    pub fn new(ttl: Duration) -> XattrNames {
        XattrNames {
            state: Mutex::new(State::default()),
            ttl,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `ino`'s names, if known.
    pub fn get(&self, ino: u64) -> Option<Names> {
        self.state()
            .names
            .get(&ino)
            .filter(|(_, at)| at.elapsed() < self.ttl)
            .map(|(n, _)| n.clone())
    }

    /// Whether `ino` is known to have no xattr `name`.
    #[cfg(test)]
    pub fn known_absent(&self, ino: u64, name: &[u8]) -> bool {
        self.get(ino).is_some_and(|n| !n.iter().any(|x| x == name))
    }

    /// Take before asking the hive.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.state().generation)
    }

    /// The hive listed `ino`'s names (asked after `ticket`).
    pub fn remember(&self, ino: u64, names: &[Vec<u8>], ticket: Ticket) {
        if names.iter().map(|n| n.len() + 1).sum::<usize>() > MAX_NAMES_BYTES {
            return;
        }
        let mut st = self.state();
        if st.generation != ticket.0 {
            return;
        }
        if st.names.len() >= MAX_ENTRIES {
            st.names.clear();
        }
        st.names.insert(ino, (names.into(), Instant::now()));
    }

    /// Anything may have changed (pushed invalidations were lost): forget everything.
    pub fn drop_all(&self) {
        let mut st = self.state();
        st.generation += 1;
        st.names.clear();
    }

    /// `ino` changed or may have: ask the hive next time.
    pub fn drop_inode(&self, ino: u64) {
        let mut st = self.state();
        st.generation += 1;
        st.names.remove(&ino);
    }
}

/// Directories' attributes from the answers to this mount's own changes (module doc).
pub struct DirAttrs {
    dirs: Mutex<HashMap<u64, DirState>>,
    ttl: Duration,
}

#[derive(Default)]
struct DirState {
    /// This mount's changes of the inode in flight.
    inflight: u32,
    /// Something else happened to it while they were: keep none of their answers.
    tainted: bool,
    /// Attributes to answer the next getattr with, and since when.
    attr: Option<(Attr, Instant)>,
}

impl DirAttrs {
    /// Attributes are used for at most `ttl`.
    pub fn new(ttl: Duration) -> DirAttrs {
        DirAttrs {
            dirs: Mutex::new(HashMap::new()),
            ttl,
        }
    }

    fn dirs(&self) -> std::sync::MutexGuard<'_, HashMap<u64, DirState>> {
        self.dirs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This mount starts changing `ino` (whatever kind it is).
    pub fn begin(&self, ino: u64) {
        let mut dirs = self.dirs();
        let d = dirs.entry(ino).or_default();
        if d.inflight > 0 {
            d.tainted = true;
        }
        d.inflight += 1;
        d.attr = None;
    }

    /// That change is answered; `attr`: the directory's attributes after it, if the answer
    /// had them.
    pub fn end(&self, ino: u64, attr: Option<Attr>) {
        let mut dirs = self.dirs();
        let Some(d) = dirs.get_mut(&ino) else {
            return;
        };
        d.inflight = d.inflight.saturating_sub(1);
        if !d.tainted {
            d.attr = attr.map(|a| (a, Instant::now()));
        }
        if d.inflight == 0 {
            d.tainted = false;
            if d.attr.is_none() {
                dirs.remove(&ino);
            }
        }
        if dirs.len() > MAX_DIR_HINTS {
            // Answers no getattr came for: drop the stale ones, or all if none is stale.
            let ttl = self.ttl;
            dirs.retain(|_, d| {
                d.inflight > 0 || d.attr.as_ref().is_some_and(|(_, at)| at.elapsed() < ttl)
            });
            if dirs.len() > MAX_DIR_HINTS {
                dirs.retain(|_, d| d.inflight > 0);
            }
        }
    }

    /// The attributes to answer a getattr of `ino` with, if an answer left some (once).
    pub fn take(&self, ino: u64) -> Option<Attr> {
        let mut dirs = self.dirs();
        let d = dirs.get_mut(&ino)?;
        let (attr, at) = d.attr.take()?;
        if d.inflight == 0 {
            dirs.remove(&ino);
        }
        (at.elapsed() < self.ttl).then_some(attr)
    }

    /// `ino` changed elsewhere (or may have).
    pub fn drop_inode(&self, ino: u64) {
        let mut dirs = self.dirs();
        if let Some(d) = dirs.get_mut(&ino) {
            d.attr = None;
            if d.inflight > 0 {
                d.tainted = true;
            } else {
                dirs.remove(&ino);
            }
        }
    }

    /// Anything may have changed elsewhere.
    pub fn drop_all(&self) {
        let mut dirs = self.dirs();
        dirs.retain(|_, d| d.inflight > 0);
        for d in dirs.values_mut() {
            d.attr = None;
            d.tainted = true;
        }
    }
}

/// Both, as the invalidation thread sees them.
pub struct Hints {
    pub xattr_names: XattrNames,
    pub dir_attrs: DirAttrs,
}

impl Hints {
    /// Answers are used for at most `ttl`.
    pub fn new(ttl: Duration) -> Hints {
        Hints {
            xattr_names: XattrNames::new(ttl),
            dir_attrs: DirAttrs::new(ttl),
        }
    }

    /// Another mount changed `ino`, or the kernel forgot it.
    pub fn drop_inode(&self, ino: u64) {
        self.xattr_names.drop_inode(ino);
        self.dir_attrs.drop_inode(ino);
    }

    /// Pushed invalidations were lost.
    pub fn drop_all(&self) {
        self.xattr_names.drop_all();
        self.dir_attrs.drop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<Vec<u8>> {
        list.iter().map(|n| n.as_bytes().to_vec()).collect()
    }

    #[test]
    fn remembered_until_dropped() {
        let c = XattrNames::new(Duration::from_secs(30));
        assert!(!c.known_absent(7, CAPABILITY));
        let t = c.ticket();
        c.remember(7, &names(&["user.a"]), t);
        assert!(c.known_absent(7, CAPABILITY));
        assert!(!c.known_absent(7, b"user.a"), "a listed name is not absent");
        assert_eq!(&c.get(7).unwrap()[..], &names(&["user.a"])[..]);
        c.drop_inode(7);
        assert!(!c.known_absent(7, CAPABILITY));
        assert!(c.get(7).is_none());
    }

    #[test]
    fn an_answer_older_than_a_drop_is_not_remembered() {
        let c = XattrNames::new(Duration::from_secs(30));
        let t = c.ticket();
        // An invalidation arrives while the query is on its way.
        c.drop_inode(9);
        c.remember(9, &[], t);
        assert!(!c.known_absent(9, CAPABILITY));
        let t = c.ticket();
        c.drop_all();
        c.remember(9, &[], t);
        assert!(!c.known_absent(9, CAPABILITY));
        let t = c.ticket();
        c.remember(9, &[], t);
        assert!(c.known_absent(9, CAPABILITY));
    }

    #[test]
    fn used_for_at_most_the_ttl() {
        let c = XattrNames::new(Duration::from_millis(20));
        let t = c.ticket();
        c.remember(3, &[], t);
        assert!(c.known_absent(3, CAPABILITY));
        std::thread::sleep(Duration::from_millis(30));
        assert!(!c.known_absent(3, CAPABILITY));
    }

    #[test]
    fn bounded() {
        let c = XattrNames::new(Duration::from_secs(30));
        for ino in 0..(MAX_ENTRIES as u64 + 5) {
            let t = c.ticket();
            c.remember(ino, &[], t);
        }
        assert!(c.state().names.len() <= MAX_ENTRIES);
        assert!(c.known_absent(MAX_ENTRIES as u64 + 4, CAPABILITY));
        // A long list is not kept at all.
        let long: Vec<Vec<u8>> = (0..100)
            .map(|i| format!("user.{i:060}").into_bytes())
            .collect();
        let t = c.ticket();
        c.remember(1, &long, t);
        assert!(c.get(1).is_none());
    }

    fn attr(ino: u64, nlink: u32) -> Attr {
        Attr {
            ino,
            gen: 1,
            kind: hivefs_net::meta::FileKind::Dir,
            perm: 0o755,
            nlink,
            uid: 0,
            gid: 0,
            size: 0,
            atime: Default::default(),
            mtime: Default::default(),
            ctime: Default::default(),
            crtime: Default::default(),
            rdev: 0,
        }
    }

    #[test]
    fn a_lone_change_leaves_its_answer_for_one_getattr() {
        let d = DirAttrs::new(Duration::from_secs(30));
        d.begin(1);
        d.end(1, Some(attr(1, 3)));
        assert_eq!(d.take(1).map(|a| a.nlink), Some(3));
        assert!(d.take(1).is_none(), "used once");
        assert!(d.dirs().is_empty());
    }

    #[test]
    fn overlapping_changes_keep_no_answer() {
        let d = DirAttrs::new(Duration::from_secs(30));
        d.begin(1);
        d.begin(1);
        // The second answer may be older than the first: neither is kept.
        d.end(1, Some(attr(1, 4)));
        d.end(1, Some(attr(1, 3)));
        assert!(d.take(1).is_none());
        // Once nothing is in flight, a lone change counts again.
        d.begin(1);
        d.end(1, Some(attr(1, 5)));
        assert_eq!(d.take(1).map(|a| a.nlink), Some(5));
    }

    #[test]
    fn an_invalidation_during_a_change_spoils_its_answer() {
        let d = DirAttrs::new(Duration::from_secs(30));
        d.begin(1);
        d.drop_inode(1);
        d.end(1, Some(attr(1, 3)));
        assert!(d.take(1).is_none());
        d.begin(2);
        d.drop_all();
        d.end(2, Some(attr(2, 3)));
        assert!(d.take(2).is_none());
    }

    #[test]
    fn an_invalidation_after_drops_the_answer() {
        let d = DirAttrs::new(Duration::from_secs(30));
        d.begin(1);
        d.end(1, Some(attr(1, 3)));
        d.drop_inode(1);
        assert!(d.take(1).is_none());
        assert!(d.dirs().is_empty());
    }

    #[test]
    fn stale_answers_are_not_used() {
        let d = DirAttrs::new(Duration::from_millis(10));
        d.begin(1);
        d.end(1, Some(attr(1, 3)));
        std::thread::sleep(Duration::from_millis(20));
        assert!(d.take(1).is_none());
    }

    #[test]
    fn unclaimed_answers_are_bounded() {
        let d = DirAttrs::new(Duration::from_secs(30));
        for ino in 0..(MAX_DIR_HINTS as u64 + 10) {
            d.begin(ino);
            d.end(ino, Some(attr(ino, 2)));
        }
        assert!(d.dirs().len() <= MAX_DIR_HINTS + 1);
    }
}
