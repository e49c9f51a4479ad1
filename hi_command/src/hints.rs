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
//!
//! # `DirNames`
//! Before every create the kernel looks the new name up (`fuse_atomic_open`), and the
//! answer is nearly always "no such name": a metadata round trip (~0.2 ms here) per file
//! that `tar x`, `cp -a`, `git checkout` or a build makes. A directory this mount made
//! itself starts empty, and while no other mount changes it (every change elsewhere is
//! pushed as an invalidation of the directory or of one of its names), this mount knows
//! its every name: the ones its own changes added and did not remove. A lookup of any
//! other name is answered ENOENT here.
//!
//! Only absence is answered from the list (a name in it is looked up at the hive), so the
//! list may err towards holding too much, never too little. What keeps it right:
//! - it starts only from this mount's own mkdir, and only if no invalidation arrived while
//!   the mkdir was on its way (a generation ticket, as for xattr names: another mount may
//!   have added a name before the mkdir's answer got here);
//! - this mount's changes apply to it when answered (added or removed names), each between
//!   [`DirNames::begin`] and [`DirNames::end`]; two changes of one name overlapping in
//!   time (their answers may come back in either order), a change whose outcome is
//!   unknown (the hive could not be reached: it may have applied), an answer showing that
//!   a name the list lacks exists or may exist (an applied unlink or exchange of it, or a
//!   refusal such as EEXIST or ENOTEMPTY: the list is wrong), a pushed invalidation of
//!   the directory or of a name in it, or lost invalidations drop the list; ENOENT and
//!   refusals of changes to listed names changed nothing and leave it;
//! - it is used for at most the TTL after this mount's last change in the directory, and
//!   [`MAX_LISTED_BYTES`] bounds all lists together (past it, the list that would grow is
//!   dropped).
//!
//! A non-exclusive `open(O_CREAT)` of a name another mount made a moment ago (its
//! invalidation not here yet) then gets EEXIST from the hive's create; `fs.rs` answers
//! that with ESTALE, which makes the kernel walk the path again asking for every name
//! (`LOOKUP_REVAL`), and the existing file is opened.

use hivefs_net::meta::Attr;
use std::collections::{HashMap, HashSet};
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

/// Most directories [`DirNames`] keeps lists for (past it, all are dropped).
pub const MAX_LISTS: usize = 1 << 16;
/// Bytes of names (plus [`NAME_OVERHEAD`] each) all of [`DirNames`]'s lists hold together.
pub const MAX_LISTED_BYTES: usize = 64 << 20;
/// What a listed name is counted as beyond its bytes (the set's own bookkeeping).
pub const NAME_OVERHEAD: usize = 48;

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

/// What one of this mount's changes does to a name in a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NameChange {
    /// The name exists afterwards (create, mkdir, symlink, link, rename target).
    Added,
    /// The name is gone afterwards (unlink, rmdir, rename source).
    Removed,
    /// The name exists before and after (both names of a rename exchange).
    Kept,
}

/// How one of this mount's changes was answered, as [`DirNames::end`] needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// It applied.
    Applied,
    /// Refused, nothing changed: a name it adds exists (EEXIST).
    Exists,
    /// Refused, nothing changed: a name it removes does not exist (ENOENT).
    Missing,
    /// Refused for another reason, nothing changed (ENOTEMPTY, EACCES, ...).
    Refused,
    /// It may have applied or not (the hive could not be reached, or answered oddly).
    Unknown,
}

/// Every name of directories this mount made and alone changed (module doc).
pub struct DirNames {
    state: Mutex<Lists>,
    ttl: Duration,
}

#[derive(Default)]
struct Lists {
    /// Bumped by every drop.
    generation: u64,
    dirs: HashMap<u64, Listing>,
    /// Bytes of all names listed, counted as [`NAME_OVERHEAD`] more each.
    bytes: usize,
}

struct Listing {
    names: HashSet<Box<[u8]>>,
    /// Names this mount's changes are changing now, and how many of them.
    inflight: HashMap<Box<[u8]>, u32>,
    /// This mount's last change in the directory (or its mkdir).
    at: Instant,
}

impl Lists {
    fn drop_dir(&mut self, dir: u64) {
        self.generation += 1;
        if let Some(l) = self.dirs.remove(&dir) {
            let freed: usize = l.names.iter().map(|n| n.len() + NAME_OVERHEAD).sum();
            self.bytes -= freed;
        }
    }
}

impl DirNames {
    /// Lists are used for at most `ttl` after this mount's last change in them.
    pub fn new(ttl: Duration) -> DirNames {
        DirNames {
            state: Mutex::new(Lists::default()),
            ttl,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Lists> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take before asking the hive for a mkdir.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.state().generation)
    }

    /// Whether nothing was dropped since `ticket` was taken (no invalidation arrived).
    pub fn unchanged_since(&self, ticket: Ticket) -> bool {
        self.state().generation == ticket.0
    }

    /// This mount made directory `dir` (its mkdir was sent after `ticket`): it is empty.
    pub fn made(&self, dir: u64, ticket: Ticket) {
        let mut st = self.state();
        if st.generation != ticket.0 {
            return;
        }
        if st.dirs.len() >= MAX_LISTS {
            st.dirs.clear();
            st.bytes = 0;
        }
        st.dirs.insert(
            dir,
            Listing {
                names: HashSet::new(),
                inflight: HashMap::new(),
                at: Instant::now(),
            },
        );
    }

    /// Whether `dir` is known to hold no `name`.
    pub fn absent(&self, dir: u64, name: &[u8]) -> bool {
        self.state()
            .dirs
            .get(&dir)
            .is_some_and(|l| l.at.elapsed() < self.ttl && !l.names.contains(name))
    }

    /// This mount starts the changes `changes` (one operation's).
    pub fn begin(&self, changes: &[(u64, Vec<u8>, NameChange)]) {
        let mut guard = self.state();
        let st: &mut Lists = &mut guard;
        for (dir, name, _) in changes {
            let Some(l) = st.dirs.get_mut(dir) else {
                continue;
            };
            let n = l.inflight.entry(name.as_slice().into()).or_insert(0);
            *n += 1;
            if *n > 1 {
                // Two changes of one name at once: their answers may come back in
                // either order.
                st.drop_dir(*dir);
            }
        }
    }

    /// Those changes are answered. A refusal changed nothing, but may say what exists: a
    /// name that existed (or may have: EEXIST, ENOTEMPTY, EISDIR, ...) and is not listed
    /// means the list misses it (dropped), as does an applied unlink or exchange of a name
    /// the list lacks; a name found missing (ENOENT) leaves the list.
    pub fn end(&self, changes: &[(u64, Vec<u8>, NameChange)], outcome: ChangeOutcome) {
        let mut guard = self.state();
        let st: &mut Lists = &mut guard;
        for (dir, name, change) in changes {
            let Some(l) = st.dirs.get_mut(dir) else {
                continue;
            };
            let name = name.as_slice();
            if let Some(n) = l.inflight.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    l.inflight.remove(name);
                }
            }
            let cost = name.len() + NAME_OVERHEAD;
            let listed = l.names.contains(name);
            // The answer shows the name existed (an unlink or exchange applied to it), or
            // may have (a refusal: EEXIST, ENOTEMPTY, EISDIR, ...), and the list lacks it:
            // the list is wrong.
            let existed = matches!(
                (outcome, change),
                (
                    ChangeOutcome::Applied,
                    NameChange::Removed | NameChange::Kept
                ) | (ChangeOutcome::Exists | ChangeOutcome::Refused, _)
            );
            if outcome == ChangeOutcome::Unknown || (existed && !listed) {
                st.drop_dir(*dir);
                continue;
            }
            if outcome == ChangeOutcome::Applied {
                l.at = Instant::now();
            }
            match (outcome, change) {
                (ChangeOutcome::Applied, NameChange::Added) if !listed => {
                    if st.bytes + cost > MAX_LISTED_BYTES {
                        st.drop_dir(*dir);
                    } else {
                        l.names.insert(name.into());
                        st.bytes += cost;
                    }
                }
                // Removed, or found missing: gone either way.
                (ChangeOutcome::Applied | ChangeOutcome::Missing, NameChange::Removed)
                    if listed =>
                {
                    l.names.remove(name);
                    st.bytes -= cost;
                }
                _ => {}
            }
        }
    }

    /// `dir` (or a name in it) changed elsewhere.
    pub fn drop_dir(&self, dir: u64) {
        self.state().drop_dir(dir);
    }

    /// Anything may have changed elsewhere.
    pub fn drop_all(&self) {
        let mut st = self.state();
        st.generation += 1;
        st.dirs.clear();
        st.bytes = 0;
    }
}

/// All of them, as the invalidation thread sees them.
pub struct Hints {
    pub xattr_names: XattrNames,
    pub dir_attrs: DirAttrs,
    pub dir_names: DirNames,
}

impl Hints {
    /// Answers are used for at most `ttl`.
    pub fn new(ttl: Duration) -> Hints {
        Hints {
            xattr_names: XattrNames::new(ttl),
            dir_attrs: DirAttrs::new(ttl),
            dir_names: DirNames::new(ttl),
        }
    }

    /// Another mount changed `ino`.
    pub fn drop_inode(&self, ino: u64) {
        self.xattr_names.drop_inode(ino);
        self.dir_attrs.drop_inode(ino);
        self.dir_names.drop_dir(ino);
    }

    /// The kernel forgot `ino`. A directory's list of names stays (it is still right:
    /// pushed invalidations drop it whether the kernel knows the inode or not), so a
    /// directory the kernel evicted and looks up again keeps answering absent names.
    pub fn forgotten(&self, ino: u64) {
        self.xattr_names.drop_inode(ino);
        self.dir_attrs.drop_inode(ino);
    }

    /// Another mount added, removed or renamed a name in directory `parent`.
    pub fn drop_entry(&self, parent: u64) {
        self.dir_names.drop_dir(parent);
    }

    /// Pushed invalidations were lost.
    pub fn drop_all(&self) {
        self.xattr_names.drop_all();
        self.dir_attrs.drop_all();
        self.dir_names.drop_all();
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

    fn change(dir: u64, name: &str, c: NameChange) -> Vec<(u64, Vec<u8>, NameChange)> {
        vec![(dir, name.as_bytes().to_vec(), c)]
    }

    /// One change of this mount, answered.
    fn apply(d: &DirNames, dir: u64, name: &str, c: NameChange, outcome: ChangeOutcome) {
        let ch = change(dir, name, c);
        d.begin(&ch);
        d.end(&ch, outcome);
    }

    #[test]
    fn a_directory_this_mount_made_knows_its_names() {
        let d = DirNames::new(Duration::from_secs(30));
        assert!(
            !d.absent(5, b"a"),
            "nothing is known of a directory not made here"
        );
        d.made(5, d.ticket());
        assert!(d.absent(5, b"a") && d.absent(5, b"b"));
        apply(&d, 5, "a", NameChange::Added, ChangeOutcome::Applied);
        assert!(!d.absent(5, b"a"), "an added name is asked for at the hive");
        assert!(d.absent(5, b"b"));
        apply(&d, 5, "a", NameChange::Removed, ChangeOutcome::Applied);
        assert!(d.absent(5, b"a"));
        // A rename within the directory: one name goes, the other comes.
        apply(&d, 5, "x", NameChange::Added, ChangeOutcome::Applied);
        let ch = vec![
            (5, b"x".to_vec(), NameChange::Removed),
            (5, b"y".to_vec(), NameChange::Added),
        ];
        d.begin(&ch);
        d.end(&ch, ChangeOutcome::Applied);
        assert!(d.absent(5, b"x") && !d.absent(5, b"y"));
        // Changes in a directory not made here change nothing.
        apply(&d, 6, "a", NameChange::Added, ChangeOutcome::Applied);
        assert!(!d.absent(6, b"b"));
        assert_eq!(d.state().bytes, 1 + NAME_OVERHEAD);
    }

    #[test]
    fn an_invalidation_during_the_mkdir_keeps_no_list() {
        let d = DirNames::new(Duration::from_secs(30));
        let t = d.ticket();
        // Another mount added a name to the new directory before the mkdir's answer.
        d.drop_dir(9);
        d.made(9, t);
        assert!(!d.absent(9, b"a"));
        let t = d.ticket();
        d.drop_all();
        d.made(9, t);
        assert!(!d.absent(9, b"a"));
    }

    #[test]
    fn what_may_have_changed_elsewhere_drops_the_list() {
        let h = Hints::new(Duration::from_secs(30));
        let d = &h.dir_names;
        for dir in 1..=4 {
            d.made(dir, d.ticket());
        }
        h.drop_entry(1);
        h.drop_inode(2);
        assert!(!d.absent(1, b"a") && !d.absent(2, b"a"));
        assert!(d.absent(3, b"a"));
        h.drop_all();
        assert!(!d.absent(3, b"a") && !d.absent(4, b"a"));
        assert_eq!(d.state().bytes, 0);
    }

    #[test]
    fn a_change_of_unknown_outcome_drops_the_list() {
        let d = DirNames::new(Duration::from_secs(30));
        d.made(5, d.ticket());
        // An unlink whose answer was lost may have applied: the name may be gone.
        apply(&d, 5, "a", NameChange::Added, ChangeOutcome::Applied);
        apply(&d, 5, "a", NameChange::Removed, ChangeOutcome::Unknown);
        assert!(!d.absent(5, b"b"));
        assert!(d.state().dirs.is_empty());
        assert_eq!(d.state().bytes, 0);
    }

    #[test]
    fn refusals_say_what_exists() {
        let d = DirNames::new(Duration::from_secs(30));
        d.made(5, d.ticket());
        apply(&d, 5, "a", NameChange::Added, ChangeOutcome::Applied);
        // Refused, nothing changed: the list stays.
        apply(&d, 5, "a", NameChange::Added, ChangeOutcome::Exists);
        apply(&d, 5, "zz", NameChange::Removed, ChangeOutcome::Missing);
        apply(&d, 5, "a", NameChange::Removed, ChangeOutcome::Refused);
        assert!(!d.absent(5, b"a") && d.absent(5, b"zz") && d.absent(5, b"b"));
        // A listed name the hive says is gone leaves the list.
        apply(&d, 5, "a", NameChange::Removed, ChangeOutcome::Missing);
        assert!(d.absent(5, b"a"));
        assert_eq!(d.state().bytes, 0);
        // A name the list lacks exists after all: the list is wrong.
        apply(&d, 5, "b", NameChange::Added, ChangeOutcome::Exists);
        assert!(!d.absent(5, b"c"));
    }

    #[test]
    fn a_name_shown_to_exist_that_the_list_lacks_drops_it() {
        let wrong = |name: &str, c: NameChange, outcome: ChangeOutcome| {
            let d = DirNames::new(Duration::from_secs(30));
            d.made(5, d.ticket());
            apply(&d, 5, "listed", NameChange::Added, ChangeOutcome::Applied);
            apply(&d, 5, name, c, outcome);
            !d.absent(5, b"other")
        };
        // An unlink or exchange that applied, or a refusal that may mean it exists.
        assert!(wrong("x", NameChange::Removed, ChangeOutcome::Applied));
        assert!(wrong("x", NameChange::Kept, ChangeOutcome::Applied));
        assert!(wrong("x", NameChange::Removed, ChangeOutcome::Refused));
        assert!(wrong("x", NameChange::Added, ChangeOutcome::Refused));
        // The same of a listed name, or ENOENT, says nothing new.
        assert!(!wrong("listed", NameChange::Kept, ChangeOutcome::Applied));
        assert!(!wrong(
            "listed",
            NameChange::Removed,
            ChangeOutcome::Refused
        ));
        assert!(!wrong("x", NameChange::Added, ChangeOutcome::Missing));
        assert!(!wrong("x", NameChange::Removed, ChangeOutcome::Missing));
    }

    #[test]
    fn overlapping_changes_of_one_name_drop_the_list() {
        let d = DirNames::new(Duration::from_secs(30));
        d.made(5, d.ticket());
        // Different names at once: both apply.
        let (a, b) = (
            change(5, "a", NameChange::Added),
            change(5, "b", NameChange::Added),
        );
        d.begin(&a);
        d.begin(&b);
        d.end(&b, ChangeOutcome::Applied);
        d.end(&a, ChangeOutcome::Applied);
        assert!(!d.absent(5, b"a") && !d.absent(5, b"b") && d.absent(5, b"c"));
        // One name twice at once (an unlink racing a create of it): the hive applied them
        // in an order this mount cannot know.
        let (add, remove) = (
            change(5, "c", NameChange::Added),
            change(5, "c", NameChange::Removed),
        );
        d.begin(&add);
        d.begin(&remove);
        d.end(&add, ChangeOutcome::Applied);
        d.end(&remove, ChangeOutcome::Applied);
        assert!(!d.absent(5, b"c") && !d.absent(5, b"z"));
    }

    #[test]
    fn a_list_is_used_for_the_ttl_after_the_last_change() {
        let d = DirNames::new(Duration::from_millis(300));
        d.made(5, d.ticket());
        std::thread::sleep(Duration::from_millis(200));
        apply(&d, 5, "a", NameChange::Added, ChangeOutcome::Applied);
        std::thread::sleep(Duration::from_millis(200));
        assert!(d.absent(5, b"b"), "the change renewed it");
        std::thread::sleep(Duration::from_millis(150));
        assert!(!d.absent(5, b"b"));
    }

    #[test]
    fn lists_are_bounded() {
        let d = DirNames::new(Duration::from_secs(30));
        d.made(1, d.ticket());
        d.made(2, d.ticket());
        let name = |i: usize| format!("{i:0200}");
        let per = 200 + NAME_OVERHEAD;
        let fit = MAX_LISTED_BYTES / per;
        for i in 0..fit {
            apply(&d, 1, &name(i), NameChange::Added, ChangeOutcome::Applied);
        }
        assert!(d.absent(1, b"x") && !d.absent(1, name(7).as_bytes()));
        // The list that would grow past the bound is dropped, the others stay.
        apply(&d, 2, &name(fit), NameChange::Added, ChangeOutcome::Applied);
        assert!(!d.absent(2, b"x"));
        assert!(d.absent(1, b"x"));
        assert_eq!(d.state().bytes, fit * per);
        for dir in 10..(10 + MAX_LISTS as u64) {
            d.made(dir, d.ticket());
        }
        assert!(d.state().dirs.len() <= MAX_LISTS);
        assert_eq!(d.state().bytes, 0);
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
