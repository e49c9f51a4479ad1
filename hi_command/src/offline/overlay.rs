//! Namespace changes made offline (`offline.rs`): what each one answers, predicted from
//! the answers kept, and how it changes those answers so that later ones show it.
//!
//! # When a change is made offline
//! Only when the answers kept say how the hive will take it: the names it reads were
//! looked up (a negative lookup counts), the inode it changes was seen, a directory it
//! removes or replaces was listed empty. Otherwise `EHOSTDOWN`, as for any change the
//! mount cannot make without the hive. The answer is the one the hive's store gives for
//! the same change to the same namespace (`engine/src/meta/store.rs`: the same checks,
//! in the same order); a change that would fail there fails here, with the same errno,
//! and is not journaled. Permissions and the "directory moved below itself" rule are
//! the kernel's to check (the mount runs with `default_permissions`; the VFS knows the
//! ancestry of its dentries).
//!
//! Made offline: unlink, rmdir, rename (replacing or not; `RENAME_EXCHANGE` needs the
//! hive), setattr (chmod, chown, times, truncate), reclaim of an unlinked inode.
//! Refused (`EHOSTDOWN`): creates of every kind (inode numbers are the hive's to hand
//! out), links, symlinks and xattr changes.
//!
//! # Invariant
//! After a change, every answer kept that it makes wrong is updated or dropped: the
//! lookups of the names it removes or adds, the attributes of every inode it touches
//! (lookups answer with the inode's own attributes: one place to update), the listings
//! of the directories it changes (kept whole: edited into one page, a new name last with
//! a cookie past every other; otherwise dropped), the extents of a truncated file.

use super::{Answers, Kept};
use fuser::Errno;
use hivefs_net::meta::{
    self as m, Answer, Attr, DirEntry, FileKind, Mutation, Query, RenameMode, SetTime, Timespec,
};

/// What a setattr without a size does to `a`, as the store does it (ctime `now`).
pub fn apply_setattr(a: &mut Attr, set: &hivefs_net::meta::SetAttr, now: Timespec) {
    let at = |t: SetTime| match t {
        SetTime::Now => now,
        SetTime::At(t) => t,
    };
    a.perm = set.perm.map_or(a.perm, |p| p & 0o7777);
    a.uid = set.uid.unwrap_or(a.uid);
    a.gid = set.gid.unwrap_or(a.gid);
    a.atime = set.atime.map_or(a.atime, at);
    a.mtime = set.mtime.map_or(a.mtime, at);
    a.ctime = now;
}

/// The entries of a whole listing in `pages`, if they hold one: from the start, each
/// page resuming after the last entry of the one before, to a page that ends it.
fn whole_listing(pages: &[(Query, Vec<DirEntry>, bool)]) -> Option<Vec<DirEntry>> {
    let resumes = |q: &Query, from: u64| match q {
        // A listing starts anywhere at or before the first cookie (`fs.rs` asks from 2:
        // the kernel's offsets 0 and 1 are "." and "..").
        Query::ReadDir { after, .. } if from <= 2 => *after <= 2,
        Query::ReadDir { after, .. } => *after == from,
        _ => false,
    };
    let mut after = 0;
    let mut all = Vec::new();
    // Each step moves to a page resuming further on: at most one step per page.
    for _ in 0..=pages.len() {
        let (_, entries, end) = pages.iter().find(|(q, _, _)| resumes(q, after))?;
        all.extend(entries.iter().filter(|e| e.cookie > after).cloned());
        if *end {
            return Some(all);
        }
        match entries.last() {
            Some(e) if e.cookie > after => after = e.cookie,
            _ => return None,
        }
    }
    None
}

/// Whether `op` is a change this module may make offline (see the module docs).
pub fn journalable(op: &Mutation) -> bool {
    match op {
        Mutation::Unlink { .. }
        | Mutation::Rmdir { .. }
        | Mutation::SetAttr { .. }
        | Mutation::Reclaim { .. } => true,
        Mutation::Rename { mode, .. } => *mode != RenameMode::Exchange,
        _ => false,
    }
}

impl Answers {
    /// The attributes kept for `ino`.
    pub(super) fn attr(&self, ino: u64) -> Option<Attr> {
        match self.get(&Query::GetAttr { ino })? {
            Ok(Answer::Attr(a)) => Some(a.clone()),
            _ => None,
        }
    }

    /// What a lookup of `name` in `parent` answers (`None`: not known here): the lookup
    /// kept, or else what the listings kept say (a name listed, with its attributes kept;
    /// a name missing from a whole listing: `ENOENT`). Attributes are the inode's own.
    pub(super) fn lookup(&self, parent: u64, name: &[u8]) -> Option<Result<Attr, Errno>> {
        let q = Query::Lookup {
            parent,
            name: name.to_vec(),
        };
        match self.get(&q) {
            Some(Ok(Answer::Attr(a))) => {
                return Some(Ok(self.attr(a.ino).unwrap_or_else(|| a.clone())))
            }
            Some(Err(e)) if *e == Errno::ENOENT => return Some(Err(Errno::ENOENT)),
            Some(_) => return None,
            None => {}
        }
        let pages = self.pages(parent);
        if let Some(e) = pages.iter().flat_map(|p| &p.1).find(|e| e.name == name) {
            return self.attr(e.ino).map(Ok);
        }
        whole_listing(&pages).map(|_| Err(Errno::ENOENT))
    }

    /// A listing page of `dir` from the pages kept: the one asked for, or cut from a
    /// whole listing (after changes made offline, the kernel resumes at cookies no page
    /// was asked for).
    pub(super) fn listing(&self, dir: u64, after: u64, max: u32) -> Option<Answer> {
        let pages = self.pages(dir);
        let mut entries = whole_listing(&pages)?;
        entries.retain(|e| e.cookie > after);
        entries.sort_by_key(|e| e.cookie);
        let end = entries.len() <= max as usize;
        entries.truncate(max as usize);
        Some(Answer::Dir { entries, end })
    }

    fn set_attr(&mut self, a: &Attr) {
        self.put(&Query::GetAttr { ino: a.ino }, Ok(Answer::Attr(a.clone())));
    }

    fn set_lookup(&mut self, parent: u64, name: &[u8], r: Kept) {
        let q = Query::Lookup {
            parent,
            name: name.to_vec(),
        };
        self.put(&q, r);
    }

    /// The kept answers about `ino` to queries `pick` chooses, with the queries.
    fn kept_of(&self, ino: u64, pick: impl Fn(&Query) -> bool) -> Vec<(Query, Kept)> {
        let Some(kept) = self.by_inode.get(&ino) else {
            return Vec::new();
        };
        kept.iter()
            .filter_map(|(k, r)| {
                let q: Query = m::decode(k).ok()?;
                pick(&q).then(|| (q, r.clone()))
            })
            .collect()
    }

    /// The listing pages kept for `dir`: (query, entries, whether the listing ends there).
    fn pages(&self, dir: u64) -> Vec<(Query, Vec<DirEntry>, bool)> {
        self.kept_of(dir, |q| matches!(q, Query::ReadDir { .. }))
            .into_iter()
            .filter_map(|(q, r)| match r {
                Ok(Answer::Dir { entries, end }) => Some((q, entries, end)),
                _ => None,
            })
            .collect()
    }

    /// `dir` is empty, as the listings kept say: `ENOTEMPTY` if they list a name,
    /// `EHOSTDOWN` if they are not whole.
    fn must_be_empty(&self, dir: u64) -> Result<(), Errno> {
        let pages = self.pages(dir);
        if pages.iter().any(|(_, e, _)| !e.is_empty()) {
            return Err(Errno::ENOTEMPTY);
        }
        whole_listing(&pages).map(|_| ()).ok_or(Errno::EHOSTDOWN)
    }

    /// Change the listing of `dir`: kept whole, it becomes one page with `edit` applied
    /// (the pages it was read in would no longer join up); otherwise its pages go (where
    /// a change lands in them is unknown).
    fn edit_listing(&mut self, dir: u64, edit: impl FnOnce(&mut Vec<DirEntry>)) {
        let pages = self.pages(dir);
        let whole = whole_listing(&pages);
        for (q, _, _) in &pages {
            self.drop_answer(q);
        }
        if let Some(mut entries) = whole {
            edit(&mut entries);
            let q = Query::ReadDir {
                ino: dir,
                after: 2,
                max: 256,
            };
            self.put(&q, Ok(Answer::Dir { entries, end: true }));
        }
    }

    fn remove_entry(&mut self, dir: u64, name: &[u8]) {
        self.edit_listing(dir, |entries| entries.retain(|e| e.name != name));
    }

    /// A new name, listed last: with a cookie past every cookie kept.
    fn add_entry(&mut self, dir: u64, name: &[u8], ino: u64, kind: FileKind) {
        self.edit_listing(dir, |entries| {
            let cookie = entries.iter().map(|e| e.cookie).max().unwrap_or(2).max(2) + 1;
            entries.push(DirEntry {
                name: name.to_vec(),
                ino,
                kind,
                cookie,
            });
        });
    }

    fn drop_answer(&mut self, q: &Query) {
        let Some(ino) = super::subject(q) else { return };
        let key = m::encode(q);
        if let Some(kept) = self.by_inode.get_mut(&ino) {
            if let Some(r) = kept.remove(&key) {
                self.bytes -= super::weight(key.len(), &r);
            }
        }
    }

    /// A directory's entries changed: its times, and its link count by `links`.
    fn touch_dir(&mut self, dir: u64, links: i32, now: Timespec) -> Option<Attr> {
        let mut a = self.attr(dir)?;
        a.nlink = a.nlink.saturating_add_signed(links);
        a.mtime = now;
        a.ctime = now;
        self.set_attr(&a);
        Some(a)
    }

    /// The name `name` of `v` in `parent` goes (unlink, rmdir, or replaced by a rename).
    fn unname(&mut self, parent: u64, name: &[u8], v: &Attr, now: Timespec) -> Attr {
        self.remove_entry(parent, name);
        self.set_lookup(parent, name, Err(Errno::ENOENT));
        let mut gone = v.clone();
        gone.ctime = now;
        gone.nlink = match v.kind {
            FileKind::Dir => 0,
            _ => v.nlink.saturating_sub(1),
        };
        self.set_attr(&gone);
        gone
    }

    /// Cut the kept extents of `ino` at `size`.
    fn truncate_extents(&mut self, ino: u64, size: u64) {
        let kept = self.kept_of(ino, |q| {
            matches!(q, Query::Extents { .. } | Query::Open { .. })
        });
        for (q, r) in kept {
            let Ok(Answer::Extents {
                mut extents,
                size: _,
                more,
            }) = r
            else {
                continue;
            };
            extents.retain(|e| e.offset < size);
            if let Some(e) = extents.last_mut() {
                e.len = e
                    .len
                    .min(u32::try_from(size - e.offset).unwrap_or(u32::MAX));
            }
            self.put(
                &q,
                Ok(Answer::Extents {
                    extents,
                    size,
                    more,
                }),
            );
        }
    }

    /// Make `op` here: its answer (then the caller journals it), an error the hive would
    /// answer as well (not journaled), or `EHOSTDOWN` (not enough is known, or a change
    /// the hive must make). See the module docs.
    pub(super) fn change(&mut self, op: &Mutation, in_dir: bool, now: Timespec) -> Kept {
        let unknown = Errno::EHOSTDOWN;
        match op {
            Mutation::Unlink { parent, name } | Mutation::Rmdir { parent, name } => {
                let rmdir = matches!(op, Mutation::Rmdir { .. });
                let v = self.lookup(*parent, name).ok_or(unknown)??;
                match (rmdir, v.kind == FileKind::Dir) {
                    (false, true) => return Err(Errno::EISDIR),
                    (true, false) => return Err(Errno::ENOTDIR),
                    (true, true) => self.must_be_empty(v.ino)?,
                    (false, false) => {}
                }
                let gone = self.unname(*parent, name, &v, now);
                let dir = self.touch_dir(*parent, if rmdir { -1 } else { 0 }, now);
                Ok(match dir.filter(|_| in_dir) {
                    Some(dir) => Answer::InDir { attr: gone, dir },
                    None => Answer::Attr(gone),
                })
            }
            Mutation::Rename {
                parent,
                name,
                new_parent,
                new_name,
                mode,
            } => {
                if *mode == RenameMode::Exchange {
                    return Err(unknown);
                }
                let src = self.lookup(*parent, name).ok_or(unknown)??;
                let dst = self.lookup(*new_parent, new_name).ok_or(unknown)?.ok();
                let unchanged = Answer::Renamed {
                    moved: src.ino,
                    replaced: None,
                };
                if parent == new_parent && name == new_name {
                    return match (mode, dst) {
                        (RenameMode::NoReplace, Some(_)) => Err(Errno::EEXIST),
                        _ => Ok(unchanged),
                    };
                }
                if let Some(d) = &dst {
                    if *mode == RenameMode::NoReplace {
                        return Err(Errno::EEXIST);
                    }
                    if d.ino == src.ino {
                        return Ok(unchanged);
                    }
                    match (src.kind == FileKind::Dir, d.kind == FileKind::Dir) {
                        (true, false) => return Err(Errno::ENOTDIR),
                        (false, true) => return Err(Errno::EISDIR),
                        (true, true) => self.must_be_empty(d.ino)?,
                        (false, false) => {}
                    }
                }
                let mut replaced = None;
                if let Some(d) = &dst {
                    self.unname(*new_parent, new_name, d, now);
                    if d.kind == FileKind::Dir {
                        self.touch_dir(*new_parent, -1, now);
                    }
                    replaced = Some(d.ino);
                }
                self.remove_entry(*parent, name);
                self.set_lookup(*parent, name, Err(Errno::ENOENT));
                let mut moved = src.clone();
                moved.ctime = now;
                self.set_attr(&moved);
                self.set_lookup(*new_parent, new_name, Ok(Answer::Attr(moved)));
                self.add_entry(*new_parent, new_name, src.ino, src.kind);
                let links = i32::from(src.kind == FileKind::Dir && parent != new_parent);
                self.touch_dir(*parent, -links, now);
                if parent != new_parent {
                    self.touch_dir(*new_parent, links, now);
                }
                Ok(Answer::Renamed {
                    moved: src.ino,
                    replaced,
                })
            }
            Mutation::SetAttr { ino, set } => {
                let mut a = self.attr(*ino).ok_or(unknown)?;
                if let Some(size) = set.size {
                    match a.kind {
                        FileKind::File => {}
                        FileKind::Dir => return Err(Errno::EISDIR),
                        _ => return Err(Errno::EINVAL),
                    }
                    if size < a.size {
                        self.truncate_extents(*ino, size);
                    }
                    a.size = size;
                    a.mtime = now;
                }
                apply_setattr(&mut a, set, now);
                self.set_attr(&a);
                Ok(Answer::Attr(a))
            }
            // The store reclaims only an inode no name references when it applies.
            Mutation::Reclaim { .. } => Ok(Answer::Done),
            _ => Err(unknown),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hivefs_net::meta::SetAttr;

    fn attr(ino: u64, kind: FileKind, nlink: u32) -> Attr {
        Attr {
            ino,
            gen: 1,
            kind,
            perm: 0o644,
            nlink,
            uid: 0,
            gid: 0,
            size: 100,
            atime: Timespec::default(),
            mtime: Timespec::default(),
            ctime: Timespec::default(),
            crtime: Timespec::default(),
            rdev: 0,
        }
    }

    fn entry(name: &str, ino: u64, kind: FileKind, cookie: u64) -> DirEntry {
        DirEntry {
            name: name.into(),
            ino,
            kind,
            cookie,
        }
    }

    /// Directory 1 holds file `a` (10), file `b` (11), empty directory `e` (12), and
    /// directory `full` (13) holding `x` (14): listed whole, attributes seen.
    fn seen() -> Answers {
        let mut s = Answers::default();
        let root = attr(1, FileKind::Dir, 4);
        s.put(&Query::GetAttr { ino: 1 }, Ok(Answer::Attr(root)));
        let kids = [
            ("a", 10, FileKind::File),
            ("b", 11, FileKind::File),
            ("e", 12, FileKind::Dir),
            ("full", 13, FileKind::Dir),
        ];
        let mut entries = Vec::new();
        for (i, (n, ino, kind)) in kids.into_iter().enumerate() {
            let a = attr(ino, kind, if kind == FileKind::Dir { 2 } else { 1 });
            s.put(&Query::GetAttr { ino }, Ok(Answer::Attr(a.clone())));
            let q = Query::Lookup {
                parent: 1,
                name: n.into(),
            };
            s.put(&q, Ok(Answer::Attr(a)));
            entries.push(entry(n, ino, kind, 3 + i as u64));
        }
        // Listed in two pages, as `fs.rs` asks (from 2, then after the last cookie).
        let second = entries.split_off(2);
        let page = |after| Query::ReadDir {
            ino: 1,
            after,
            max: 256,
        };
        s.put(
            &page(2),
            Ok(Answer::Dir {
                entries,
                end: false,
            }),
        );
        s.put(
            &page(4),
            Ok(Answer::Dir {
                entries: second,
                end: true,
            }),
        );
        let empty = Query::ReadDir {
            ino: 12,
            after: 2,
            max: 256,
        };
        s.put(
            &empty,
            Ok(Answer::Dir {
                entries: vec![],
                end: true,
            }),
        );
        let full = Query::ReadDir {
            ino: 13,
            after: 2,
            max: 256,
        };
        let x = vec![entry("x", 14, FileKind::File, 3)];
        s.put(
            &full,
            Ok(Answer::Dir {
                entries: x,
                end: true,
            }),
        );
        s
    }

    fn names(s: &Answers, dir: u64) -> Vec<String> {
        match s.listing(dir, 2, 256) {
            Some(Answer::Dir { entries, end: true }) => entries
                .iter()
                .map(|e| String::from_utf8_lossy(&e.name).into_owned())
                .collect(),
            other => panic!("no whole listing: {other:?}"),
        }
    }

    fn rename(from: &str, to: &str) -> Mutation {
        Mutation::Rename {
            parent: 1,
            name: from.into(),
            new_parent: 1,
            new_name: to.into(),
            mode: RenameMode::Replace,
        }
    }

    const NOW: Timespec = Timespec { sec: 99, nsec: 0 };

    #[test]
    fn lookups_come_from_lookups_kept_or_whole_listings() {
        let s = seen();
        assert_eq!(s.lookup(1, b"a").unwrap().unwrap().ino, 10);
        assert_eq!(s.lookup(1, b"zz"), Some(Err(Errno::ENOENT)));
        assert_eq!(s.lookup(13, b"x"), None, "listed, attributes never seen");
        assert_eq!(s.lookup(13, b"y"), Some(Err(Errno::ENOENT)));
        assert_eq!(s.lookup(99, b"a"), None, "never listed");
        // A listing whose pages do not join up is not whole.
        let mut gap = seen();
        gap.drop_answer(&Query::ReadDir {
            ino: 1,
            after: 2,
            max: 256,
        });
        assert_eq!(gap.lookup(1, b"zz"), None);
    }

    #[test]
    fn changes_answer_as_the_store_would_and_show_at_once() {
        let mut s = seen();
        // Refused as the store refuses them, nothing changed.
        let unlink = |n: &str| Mutation::Unlink {
            parent: 1,
            name: n.into(),
        };
        let rmdir = |n: &str| Mutation::Rmdir {
            parent: 1,
            name: n.into(),
        };
        assert_eq!(s.change(&unlink("e"), true, NOW), Err(Errno::EISDIR));
        assert_eq!(s.change(&rmdir("a"), true, NOW), Err(Errno::ENOTDIR));
        assert_eq!(s.change(&rmdir("full"), true, NOW), Err(Errno::ENOTEMPTY));
        assert_eq!(s.change(&unlink("zz"), true, NOW), Err(Errno::ENOENT));
        assert_eq!(
            s.change(&rename("a", "full"), false, NOW),
            Err(Errno::EISDIR)
        );
        assert_eq!(s.change(&rename("e", "a"), false, NOW), Err(Errno::ENOTDIR));
        let noreplace = Mutation::Rename {
            parent: 1,
            name: b"a".to_vec(),
            new_parent: 1,
            new_name: b"b".to_vec(),
            mode: RenameMode::NoReplace,
        };
        assert_eq!(s.change(&noreplace, false, NOW), Err(Errno::EEXIST));
        assert_eq!(names(&s, 1), ["a", "b", "e", "full"]);
        // Not enough known, or the hive's to make: host down.
        let create = Mutation::Create {
            parent: 1,
            name: b"n".to_vec(),
            kind: FileKind::File,
            perm: 0o644,
            uid: 0,
            gid: 0,
            rdev: 0,
        };
        assert_eq!(s.change(&create, true, NOW), Err(Errno::EHOSTDOWN));
        let unseen = Mutation::Unlink {
            parent: 13,
            name: b"x".to_vec(),
        };
        assert_eq!(s.change(&unseen, true, NOW), Err(Errno::EHOSTDOWN));

        // A rename over a file: the old name goes, the new one shows the moved inode,
        // the replaced inode loses a link, listings follow.
        let r = s.change(&rename("a", "b"), false, NOW).unwrap();
        assert_eq!(
            r,
            Answer::Renamed {
                moved: 10,
                replaced: Some(11)
            }
        );
        assert_eq!(s.lookup(1, b"a"), Some(Err(Errno::ENOENT)));
        assert_eq!(s.lookup(1, b"b").unwrap().unwrap().ino, 10);
        assert_eq!(s.attr(11).unwrap().nlink, 0);
        // The new name is a new entry (as the store links it): listed last.
        assert_eq!(names(&s, 1), ["e", "full", "b"]);
        // A rename to a new name: listed last, with a cookie past every other.
        s.change(&rename("b", "c"), false, NOW).unwrap();
        assert_eq!(names(&s, 1), ["e", "full", "c"]);
        let Some(Answer::Dir { entries, .. }) = s.listing(1, 2, 256) else {
            panic!()
        };
        let c = entries.iter().find(|e| e.name == b"c").unwrap().cookie;
        assert!(entries.iter().all(|e| e.name == b"c" || e.cookie < c));
        // The kernel resumes after the last entry it got: an empty last page.
        assert_eq!(
            s.listing(1, c, 256),
            Some(Answer::Dir {
                entries: vec![],
                end: true
            })
        );
        // rmdir of the empty directory: the parent loses a link.
        let r = s.change(&rmdir("e"), true, NOW).unwrap();
        let Answer::InDir { attr: gone, dir } = r else {
            panic!("{r:?}")
        };
        assert_eq!((gone.ino, gone.nlink, dir.ino, dir.nlink), (12, 0, 1, 3));
        assert_eq!(dir.mtime, NOW);
        assert_eq!(names(&s, 1), ["full", "c"]);
        // unlink, then setattr of the file still open.
        let r = s.change(&unlink("c"), true, NOW).unwrap();
        assert!(matches!(r, Answer::InDir { attr, .. } if attr.nlink == 0 && attr.ino == 10));
        let set = Mutation::SetAttr {
            ino: 10,
            set: SetAttr {
                perm: Some(0o600),
                size: Some(5),
                ..SetAttr::default()
            },
        };
        let Answer::Attr(a) = s.change(&set, false, NOW).unwrap() else {
            panic!()
        };
        assert_eq!((a.perm, a.size, a.mtime, a.ctime), (0o600, 5, NOW, NOW));
        assert_eq!(s.attr(10), Some(a));
        let dir_size = Mutation::SetAttr {
            ino: 13,
            set: SetAttr {
                size: Some(0),
                ..SetAttr::default()
            },
        };
        assert_eq!(s.change(&dir_size, false, NOW), Err(Errno::EISDIR));
    }

    #[test]
    fn truncation_cuts_the_extents_kept() {
        let mut s = seen();
        let ext = |offset, len| m::Extent {
            offset,
            len,
            chunk: hivefs_net::chunk::ChunkId([7; hivefs_net::chunk::CHUNK_ID_BYTES]),
            chunk_offset: 0,
        };
        let q = Query::Extents {
            ino: 10,
            from: 0,
            to: u64::MAX,
            max: 64,
        };
        let kept = Answer::Extents {
            extents: vec![ext(0, 40), ext(40, 60)],
            size: 100,
            more: false,
        };
        s.put(&q, Ok(kept));
        let set = Mutation::SetAttr {
            ino: 10,
            set: SetAttr {
                size: Some(50),
                ..SetAttr::default()
            },
        };
        s.change(&set, false, NOW).unwrap();
        assert_eq!(
            s.get(&q).cloned(),
            Some(Ok(Answer::Extents {
                extents: vec![ext(0, 40), ext(40, 10)],
                size: 50,
                more: false
            }))
        );
    }
}
