//! Unit tests of the in-memory file system: paths, POSIX-like semantics, limits, and the
//! trees that go to and from the host.

use alloc::vec;
use alloc::vec::Vec;

use super::*;

const LIMITS: Limits = Limits {
    max_bytes: 1 << 20,
    max_inodes: 64,
};

fn fs_with_root() -> (Fs, Ino) {
    let mut fs = Fs::new(LIMITS);
    let root = fs.add_root(1).unwrap();
    (fs, root)
}

fn file(path: &str, bytes: &[u8]) -> Entry {
    Entry {
        path: path.into(),
        node: Node::File(bytes.to_vec()),
    }
}

fn dir(path: &str) -> Entry {
    Entry {
        path: path.into(),
        node: Node::Dir,
    }
}

fn names(fs: &Fs, d: Ino) -> Vec<String> {
    fs.list(d).unwrap().into_iter().map(|e| e.name).collect()
}

#[test]
fn paths_resolve_inside_their_base_and_never_above_it() {
    let (mut fs, root) = fs_with_root();
    let a = fs.mkdir(root, "a", 1).unwrap();
    let b = fs.mkdir(a, "b", 1).unwrap();
    let f = fs.create_file(b, "f", 1).unwrap();
    assert_eq!(fs.lookup(root, "a/b/f"), Ok(f));
    assert_eq!(fs.lookup(root, "a//b/./f"), Ok(f));
    assert_eq!(fs.lookup(root, "a/b/../b/f"), Ok(f));
    assert_eq!(fs.lookup(root, "a/b/"), Ok(b));
    assert_eq!(fs.lookup(root, "."), Ok(root));
    assert_eq!(fs.lookup(root, "a/b/.."), Ok(a));
    assert_eq!(fs.lookup(b, ".."), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, ".."), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, "a/../.."), Err(Errno::Perm));
    assert_eq!(fs.lookup(b, "../../.."), Err(Errno::Perm));
    // A descriptor for `a` cannot climb to the root even though the root is in the tree.
    assert_eq!(fs.lookup(a, "../a"), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, "/a"), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, ""), Err(Errno::NoEnt));
    assert_eq!(fs.lookup(root, "missing/f"), Err(Errno::NoEnt));
    assert_eq!(fs.lookup(root, "a/b/f/g"), Err(Errno::NotDir));
    assert_eq!(fs.lookup(root, "a/b/f/"), Err(Errno::NotDir));
    assert_eq!(fs.lookup(f, "x"), Err(Errno::NotDir));
    assert_eq!(fs.lookup(root, "a\0"), Err(Errno::Inval));
    let long = "x".repeat(tree::MAX_NAME + 1);
    assert_eq!(fs.lookup(root, &long), Err(Errno::NameTooLong));
    let r = fs.resolve(root, "a/new/").unwrap();
    assert_eq!(
        (r.dir, r.name.as_deref(), r.trailing_slash),
        (a, Some("new"), true)
    );
}

#[test]
fn files_read_write_grow_and_shrink() {
    let (mut fs, root) = fs_with_root();
    let f = fs.create_file(root, "f", 1).unwrap();
    assert_eq!(fs.write(f, 0, b"hello", 2), Ok(5));
    assert_eq!(fs.write(f, 8, b"!", 3), Ok(1));
    let mut buf = [0xffu8; 16];
    assert_eq!(fs.read(f, 0, &mut buf), Ok(9));
    assert_eq!(&buf[..9], b"hello\0\0\0!");
    assert_eq!(fs.read(f, 100, &mut buf), Ok(0));
    assert_eq!(fs.read_slice(f, 1, 3), Ok(&b"ell"[..]));
    fs.set_size(f, 2, 4).unwrap();
    assert_eq!(fs.stat(f).unwrap().size, 2);
    assert_eq!(fs.stat(f).unwrap().mtime_ns, 4);
    assert_eq!(fs.bytes(), 2);
    assert_eq!(fs.read(root, 0, &mut buf), Err(Errno::IsDir));
    assert_eq!(fs.write(root, 0, b"x", 1), Err(Errno::IsDir));
    assert_eq!(fs.write(f, u64::MAX, b"x", 1), Err(Errno::FBig));
}

#[test]
fn limits_give_nospc_not_an_allocation_failure() {
    let mut fs = Fs::new(Limits {
        max_bytes: 10,
        max_inodes: 3,
    });
    let root = fs.add_root(0).unwrap();
    let f = fs.create_file(root, "f", 0).unwrap();
    assert_eq!(fs.write(f, 0, &[1; 10], 0), Ok(10));
    assert_eq!(fs.write(f, 10, &[1], 0), Err(Errno::NoSpc));
    assert_eq!(fs.set_size(f, 1 << 40, 0), Err(Errno::NoSpc));
    assert_eq!(fs.set_size(f, u64::MAX, 0), Err(Errno::NoSpc));
    assert_eq!(fs.bytes(), 10, "a refused resize changes nothing");
    assert_eq!(fs.write(f, 1 << 40, &[1], 0), Err(Errno::NoSpc));
    fs.mkdir(root, "d", 0).unwrap();
    assert_eq!(fs.create_file(root, "g", 0), Err(Errno::NoSpc));
    // Freeing space makes room again.
    fs.unlink(root, "f", 0).unwrap();
    assert_eq!(fs.bytes(), 0);
    let g = fs.create_file(root, "g", 0).unwrap();
    assert_eq!(fs.write(g, 0, &[2; 10], 0), Ok(10));
}

#[test]
fn names_are_created_once_and_removed_by_kind() {
    let (mut fs, root) = fs_with_root();
    let d = fs.mkdir(root, "d", 1).unwrap();
    fs.create_file(d, "f", 1).unwrap();
    assert_eq!(fs.mkdir(root, "d", 1), Err(Errno::Exist));
    assert_eq!(fs.create_file(root, "d", 1), Err(Errno::Exist));
    assert_eq!(fs.unlink(root, "d", 1), Err(Errno::IsDir));
    assert_eq!(fs.rmdir(d, "f", 1), Err(Errno::NotDir));
    assert_eq!(fs.rmdir(root, "d", 1), Err(Errno::NotEmpty));
    assert_eq!(fs.unlink(root, "nope", 1), Err(Errno::NoEnt));
    fs.unlink(d, "f", 1).unwrap();
    fs.rmdir(root, "d", 1).unwrap();
    assert!(names(&fs, root).is_empty());
    assert_eq!(fs.inode_count(), 1, "only the root is left");
}

#[test]
fn an_open_file_outlives_its_name() {
    let (mut fs, root) = fs_with_root();
    let f = fs.create_file(root, "f", 1).unwrap();
    fs.write(f, 0, b"data", 1).unwrap();
    fs.open(f).unwrap();
    fs.unlink(root, "f", 1).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(fs.read(f, 0, &mut buf), Ok(4));
    assert_eq!(fs.stat(f).unwrap().nlink, 0);
    assert_eq!(fs.bytes(), 4);
    fs.close(f);
    assert_eq!(fs.stat(f), Err(Errno::BadF));
    assert_eq!(fs.bytes(), 0);
}

#[test]
fn hard_links_share_bytes() {
    let (mut fs, root) = fs_with_root();
    let f = fs.create_file(root, "f", 1).unwrap();
    fs.link(f, root, "g").unwrap();
    fs.write(f, 0, b"shared", 1).unwrap();
    assert_eq!(
        fs.read_slice(fs.lookup(root, "g").unwrap(), 0, 99),
        Ok(&b"shared"[..])
    );
    assert_eq!(fs.stat(f).unwrap().nlink, 2);
    assert_eq!(fs.link(root, root, "r"), Err(Errno::Perm));
    fs.unlink(root, "f", 1).unwrap();
    assert_eq!(fs.bytes(), 6, "g still holds the bytes");
}

#[test]
fn rename_follows_posix() {
    let (mut fs, root) = fs_with_root();
    let a = fs.mkdir(root, "a", 1).unwrap();
    let b = fs.mkdir(a, "b", 1).unwrap();
    let f = fs.create_file(root, "f", 1).unwrap();
    let g = fs.create_file(root, "g", 1).unwrap();
    fs.write(g, 0, b"old", 1).unwrap();
    // A file replaces a file; the replaced one's bytes are freed.
    fs.rename(root, "f", root, "g", 2).unwrap();
    assert_eq!(fs.lookup(root, "g"), Ok(f));
    assert_eq!(fs.bytes(), 0);
    // Into another directory and back.
    fs.rename(root, "g", b, "h", 2).unwrap();
    assert_eq!(fs.lookup(root, "a/b/h"), Ok(f));
    // Kinds must agree; a directory cannot move into itself.
    let e = fs.mkdir(root, "e", 2).unwrap();
    assert_eq!(fs.rename(b, "h", root, "e", 2), Err(Errno::IsDir));
    fs.create_file(root, "file", 2).unwrap();
    assert_eq!(fs.rename(root, "e", root, "file", 2), Err(Errno::NotDir));
    assert_eq!(fs.rename(root, "a", b, "x", 2), Err(Errno::Inval));
    assert_eq!(fs.rename(root, "a", a, "x", 2), Err(Errno::Inval));
    assert_eq!(fs.rename(root, "e", root, "a", 2), Err(Errno::NotEmpty));
    assert_eq!(
        fs.rename(root, "e", root, "a/x", 2),
        Err(Errno::Inval),
        "a name, not a path"
    );
    // A directory replaces an empty directory, and its parent link follows it.
    fs.rename(a, "b", root, "e", 2).unwrap();
    assert_eq!(fs.lookup(root, "e"), Ok(b));
    assert_eq!(fs.lookup(b, "h"), Ok(f));
    assert_eq!(fs.parent(b), Ok(root), "`..` of the moved directory");
    assert!(fs.stat(e).is_err(), "the replaced directory is gone");
    // Renaming onto itself changes nothing.
    fs.rename(b, "h", b, "h", 3).unwrap();
    assert_eq!(fs.lookup(root, "e/h"), Ok(f));
    assert_eq!(fs.rename(root, "missing", root, "x", 3), Err(Errno::NoEnt));
}

#[test]
fn listings_keep_the_order_names_were_added() {
    let (mut fs, root) = fs_with_root();
    fs.create_file(root, "b", 1).unwrap();
    let d = fs.mkdir(root, "a", 1).unwrap();
    fs.create_file(root, "c", 1).unwrap();
    let list = fs.list(root).unwrap();
    assert_eq!(names(&fs, root), ["b", "a", "c"]);
    assert_eq!(list[0].kind, Kind::File);
    assert_eq!(list[1].kind, Kind::Dir);
    assert_eq!(fs.parent(d), Ok(root));
    // A renamed name goes last; a removed one leaves the others in place.
    fs.rename(root, "b", root, "z", 2).unwrap();
    fs.unlink(root, "c", 2).unwrap();
    assert_eq!(names(&fs, root), ["a", "z"]);
    // Directories report Linux's size and link count: 2 plus their subdirectories.
    fs.mkdir(root, "e", 2).unwrap();
    fs.mkdir(d, "inner", 2).unwrap();
    let st = fs.stat(root).unwrap();
    assert_eq!((st.size, st.nlink), (DIR_SIZE, 4));
    assert_eq!(fs.stat(d).unwrap().nlink, 3);
}

#[test]
fn a_loaded_tree_lists_in_the_order_the_host_sent() {
    let (mut fs, root) = fs_with_root();
    let entries = vec![
        file("zeta", b"1"),
        dir("alpha"),
        file("alpha/y", b""),
        file("mid", b""),
    ];
    fs.load(0, entries, 0).unwrap();
    assert_eq!(names(&fs, root), ["zeta", "alpha", "mid"]);
    fs.create_file(root, "beta", 1).unwrap();
    assert_eq!(names(&fs, root), ["zeta", "alpha", "mid", "beta"]);
}

#[test]
fn symbolic_links_resolve_inside_their_base_only() {
    let (mut fs, root) = fs_with_root();
    let a = fs.mkdir(root, "a", 1).unwrap();
    let f = fs.create_file(a, "f", 1).unwrap();
    let l = fs.symlink(root, "to-f", "a/f", 1).unwrap();
    fs.symlink(root, "to-a", "a", 1).unwrap();
    fs.symlink(a, "up", "../a/f", 1).unwrap();
    fs.symlink(a, "escape", "../..", 1).unwrap();
    fs.symlink(root, "abs", "/etc/passwd", 1).unwrap();
    fs.symlink(root, "dangling", "nowhere", 1).unwrap();
    fs.symlink(root, "loop1", "loop2", 1).unwrap();
    fs.symlink(root, "loop2", "loop1", 1).unwrap();
    assert_eq!(fs.lookup(root, "to-f"), Ok(f));
    assert_eq!(fs.lookup_with(root, "to-f", false), Ok(l));
    assert_eq!(
        fs.lookup_with(root, "to-a/f", false),
        Ok(f),
        "links on the way are followed"
    );
    assert_eq!(fs.lookup(root, "a/up"), Ok(f));
    assert_eq!(fs.lookup(a, "up"), Err(Errno::Perm), "`..` above the base");
    assert_eq!(fs.lookup(root, "a/escape"), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, "abs"), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, "dangling"), Err(Errno::NoEnt));
    assert_eq!(fs.lookup(root, "loop1"), Err(Errno::Loop));
    assert_eq!(fs.lookup(root, "to-f/"), Err(Errno::NotDir));
    assert_eq!(
        fs.lookup_with(root, "to-a/", false),
        Ok(a),
        "a trailing slash follows"
    );
    assert_eq!(fs.readlink(l), Ok("a/f"));
    assert_eq!(fs.readlink(f), Err(Errno::Inval));
    let st = fs.stat(l).unwrap();
    assert_eq!((st.kind, st.size, st.nlink), (Kind::Symlink, 3, 1));
    // Removing the link leaves its target; rmdir refuses it.
    assert_eq!(fs.rmdir(root, "to-a", 2), Err(Errno::NotDir));
    fs.unlink(root, "to-a", 2).unwrap();
    assert_eq!(fs.lookup(root, "a/f"), Ok(f));
    assert_eq!(fs.symlink(root, "to-f", "x", 2), Err(Errno::Exist));
}

#[test]
fn symbolic_links_travel_in_trees() {
    let (mut fs, root) = fs_with_root();
    let entries = vec![
        dir("d"),
        Entry {
            path: "d/link".into(),
            node: Node::Symlink("../f".into()),
        },
        file("f", b"x"),
    ];
    fs.load(0, entries, 0).unwrap();
    let link = fs.lookup_with(root, "d/link", false).unwrap();
    assert_eq!(fs.readlink(link), Ok("../f"));
    fs.symlink(root, "new", "d", 1).unwrap();
    let out = fs.export(0).unwrap();
    assert!(out.contains(&Entry {
        path: "d/link".into(),
        node: Node::Symlink("../f".into())
    }));
    assert!(out.contains(&Entry {
        path: "new".into(),
        node: Node::Symlink("d".into())
    }));
}

#[test]
fn trees_load_and_come_back_with_only_changes_carrying_bytes() {
    let (mut fs, root) = fs_with_root();
    fs.load(
        0,
        vec![
            dir("d"),
            file("d/keep", b"same"),
            file("d/edit", b"before"),
            file("moved", b"m"),
            file("gone", b"g"),
        ],
        5,
    )
    .unwrap();
    assert_eq!(fs.bytes(), 4 + 6 + 1 + 1);
    let edit = fs.lookup(root, "d/edit").unwrap();
    fs.write(edit, 0, b"after!", 6).unwrap();
    let d = fs.lookup(root, "d").unwrap();
    fs.rename(root, "moved", d, "m2", 6).unwrap();
    fs.unlink(root, "gone", 6).unwrap();
    let n = fs.mkdir(root, "new", 6).unwrap();
    let x = fs.create_file(n, "x", 6).unwrap();
    fs.write(x, 0, b"x", 6).unwrap();
    assert_eq!(
        fs.export(0).unwrap(),
        vec![
            dir("d"),
            Entry {
                path: "d/keep".into(),
                node: Node::Unchanged
            },
            file("d/edit", b"after!"),
            file("d/m2", b"m"),
            dir("new"),
            file("new/x", b"x"),
        ]
    );
}

#[test]
fn bad_trees_are_refused() {
    for entries in [
        vec![file("../escape", b"x")],
        vec![file("/abs", b"x")],
        vec![file("a/b", b"x")],
        vec![dir("a"), dir("a")],
        vec![Entry {
            path: "u".into(),
            node: Node::Unchanged,
        }],
        vec![file("f", b"x"), file("f/g", b"y")],
    ] {
        let (mut fs, _) = fs_with_root();
        assert!(fs.load(0, entries.clone(), 0).is_err(), "{entries:?}");
    }
    let (mut fs, _) = fs_with_root();
    assert_eq!(
        fs.load(0, vec![file("big", &[0; (1 << 20) + 1])], 0),
        Err(Errno::NoSpc)
    );
    assert_eq!(fs.load(1, vec![], 0), Err(Errno::BadF));
}

/// Where `path` leads under `root`: its directory and last name, if it resolves to one.
fn at(fs: &Fs, root: Ino, path: &str) -> Option<(Ino, String)> {
    fs.resolve(root, path)
        .ok()
        .and_then(|r| r.name.map(|n| (r.dir, n)))
}

/// Random operations from a fixed seed, as a hostile tool might issue them (names that climb,
/// huge sizes, open handles to removed files): nothing panics, and the byte and inode counts
/// always match what is alive.
#[test]
fn random_operations_keep_the_books_straight() {
    let mut fs = Fs::new(Limits {
        max_bytes: 64 << 10,
        max_inodes: 40,
    });
    let root = fs.add_root(0).unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    const NAMES: [&str; 9] = ["a", "b", "c", "a/b", "a/c", "b/a", "..", ".", "a/../b"];
    let mut open: Vec<Ino> = Vec::new();
    // Operations that succeeded, by kind, so the test cannot pass by doing nothing.
    let mut done = [0u32; 11];
    for step in 0..20_000u64 {
        let r = next();
        let path = NAMES[usize::try_from(next()).unwrap() % NAMES.len()];
        let other = NAMES[usize::try_from(next()).unwrap() % NAMES.len()];
        let size = match (r >> 16) % 4 {
            0 => 0,
            1 => (r >> 24) % 5000,
            2 => (r >> 24) % (80 << 10),
            _ => u64::MAX - (r >> 40),
        };
        match r % 11 {
            0 => {
                if let Some((d, n)) = at(&fs, root, path) {
                    done[0] += u32::from(fs.create_file(d, &n, step).is_ok());
                }
            }
            1 => {
                if let Some((d, n)) = at(&fs, root, path) {
                    done[1] += u32::from(fs.mkdir(d, &n, step).is_ok());
                }
            }
            2 => {
                if let Ok(ino) = fs.lookup(root, path) {
                    done[2] += u32::from(fs.write(ino, size % (70 << 10), &[7; 100], step).is_ok());
                }
            }
            3 => {
                if let Ok(ino) = fs.lookup(root, path) {
                    done[3] += u32::from(fs.set_size(ino, size, step).is_ok());
                }
            }
            4 => {
                if let Some((d, n)) = at(&fs, root, path) {
                    done[4] += u32::from(fs.unlink(d, &n, step).is_ok());
                }
            }
            5 => {
                if let Some((d, n)) = at(&fs, root, path) {
                    done[5] += u32::from(fs.rmdir(d, &n, step).is_ok());
                }
            }
            6 => {
                if let (Some((d1, n1)), Some((d2, n2))) =
                    (at(&fs, root, path), at(&fs, root, other))
                {
                    done[6] += u32::from(fs.rename(d1, &n1, d2, &n2, step).is_ok());
                }
            }
            7 => {
                if let Ok(ino) = fs.lookup(root, path)
                    && open.len() < 8
                    && fs.open(ino).is_ok()
                {
                    open.push(ino);
                }
            }
            8 => {
                if let Some(ino) = open.pop() {
                    fs.close(ino);
                }
            }
            9 => {
                if let (Ok(ino), Some((d, n))) = (fs.lookup(root, path), at(&fs, root, other)) {
                    done[9] += u32::from(fs.link(ino, d, &n).is_ok());
                }
            }
            _ => {
                if let Some((d, n)) = at(&fs, root, path) {
                    let target = "t".repeat(usize::try_from(size % 3000).unwrap());
                    done[10] += u32::from(fs.symlink(d, &n, &target, step).is_ok());
                }
            }
        }
        // The books: bytes are exactly the live files' sizes and link targets, once per name,
        // within the cap; the names are those in the directories.
        let live: u64 = fs.inodes.values().map(|n| n.size() * n.nlink.max(1)).sum();
        assert_eq!(fs.bytes(), live, "step {step}");
        let names: usize = fs
            .inodes
            .values()
            .filter_map(|n| match &n.data {
                Data::Dir(d) => Some(d.names.len()),
                _ => None,
            })
            .sum();
        assert_eq!(fs.names, names, "step {step}");
        assert!(fs.bytes() <= 64 << 10, "step {step}");
        assert!(fs.inode_count() <= 40, "step {step}");
        assert!(fs.lookup(root, "..").is_err());
    }
    assert!(
        done.iter()
            .enumerate()
            .all(|(i, &n)| n > 5 || i == 7 || i == 8),
        "too few operations succeeded: {done:?}"
    );
    for ino in open.drain(..) {
        fs.close(ino);
    }
    // Removing everything frees everything.
    let _ = fs.export(0).unwrap();
}

/// Sum of the capacities of all files' buffers: the memory file data really takes.
fn file_capacity(fs: &Fs) -> usize {
    fs.inodes
        .values()
        .map(|n| match &n.data {
            Data::File { bytes, .. } => bytes.capacity(),
            _ => 0,
        })
        .sum()
}

/// Checks a tree the host gets back: plain paths within MAX_PATH, no path twice, each
/// entry's parent a directory listed before it.
fn assert_well_formed(entries: &[Entry]) {
    let mut dirs = alloc::collections::BTreeSet::new();
    let mut seen = alloc::collections::BTreeSet::new();
    for e in entries {
        assert_eq!(tree::check_path(&e.path), Ok(()), "{}", e.path);
        assert!(seen.insert(e.path.clone()), "{} twice", e.path);
        if let Some(parent) = tree::parent(&e.path) {
            assert!(dirs.contains(parent), "{} before its parent", e.path);
        }
        if e.node == Node::Dir {
            dirs.insert(e.path.clone());
        }
    }
}

#[test]
fn link_targets_and_extra_names_count_against_the_limits() {
    let mut fs = Fs::new(Limits {
        max_bytes: 9_000,
        max_inodes: 50,
    });
    let root = fs.add_root(0).unwrap();
    // Without a charge, 50 links with 4 KiB targets would hold 200 KB over a 10 KB cap.
    let long = "x/".repeat(2000);
    fs.symlink(root, "l1", &long, 0).unwrap();
    fs.symlink(root, "l2", &long, 0).unwrap();
    assert_eq!(fs.bytes(), 8000);
    assert_eq!(fs.symlink(root, "l3", &long, 0), Err(Errno::NoSpc));
    fs.unlink(root, "l1", 0).unwrap();
    assert_eq!(fs.bytes(), 4000);
    // A file's bytes count once per name: each name goes back to the host as a copy.
    let f = fs.create_file(root, "f", 0).unwrap();
    fs.write(f, 0, &[1; 2000], 0).unwrap();
    assert_eq!(fs.bytes(), 6000);
    fs.link(f, root, "g").unwrap();
    assert_eq!(fs.bytes(), 8000);
    assert_eq!(fs.link(f, root, "h"), Err(Errno::NoSpc));
    assert_eq!(fs.set_size(f, 2501, 0), Err(Errno::NoSpc));
    fs.set_size(f, 2500, 0).unwrap();
    assert_eq!(fs.bytes(), 9000);
    fs.unlink(root, "g", 0).unwrap();
    assert_eq!(fs.bytes(), 6500);
    // A file only a descriptor holds counts once, until it is closed.
    fs.open(f).unwrap();
    fs.unlink(root, "f", 0).unwrap();
    assert_eq!(fs.bytes(), 6500);
    fs.close(f);
    assert_eq!(fs.bytes(), 4000);
    // Names cost no inode but are capped too: a million hard links to an empty file would
    // otherwise take unbounded memory.
    let e = fs.create_file(root, "e", 0).unwrap();
    let made = (0..1000)
        .filter(|i| fs.link(e, root, &alloc::format!("n{i}")).is_ok())
        .count();
    assert_eq!(made, 48);
    assert_eq!(fs.link(e, root, "more"), Err(Errno::NoSpc));
    assert_eq!(fs.mkdir(root, "more", 0), Err(Errno::NoSpc));
    fs.unlink(root, "n0", 0).unwrap();
    fs.link(e, root, "more").unwrap();
}

#[test]
fn huge_offsets_and_sizes_are_refused_and_gaps_are_charged() {
    let (mut fs, root) = fs_with_root();
    let f = fs.create_file(root, "f", 0).unwrap();
    for off in [u64::MAX, u64::MAX - 1, 1 << 63, 1 << 40, 1 << 20] {
        let r = fs.write(f, off, b"x", 0);
        assert!(matches!(r, Err(Errno::FBig | Errno::NoSpc)), "{off}: {r:?}");
        let r = fs.set_size(f, off.saturating_add(1), 0);
        assert!(matches!(r, Err(Errno::FBig | Errno::NoSpc)), "{off}: {r:?}");
        // Writing nothing anywhere changes nothing (Linux does not extend the file either).
        assert_eq!(fs.write(f, off, b"", 0), Ok(0));
        let mut buf = [0u8; 4];
        assert_eq!(fs.read(f, off, &mut buf), Ok(0));
        assert_eq!(fs.read_slice(f, off, usize::MAX), Ok(&[][..]));
    }
    assert_eq!(fs.stat(f).unwrap().size, 0);
    assert_eq!(fs.bytes(), 0);
    // A sparse write is zero-filled and its gap charged: the last byte of the cap fits.
    fs.write(f, (1 << 20) - 1, b"x", 0).unwrap();
    assert_eq!(fs.bytes(), 1 << 20);
    let g = fs.create_file(root, "g", 0).unwrap();
    assert_eq!(fs.write(g, 0, b"x", 0), Err(Errno::NoSpc));
    assert_eq!(fs.set_size(g, 1, 0), Err(Errno::NoSpc));
}

#[test]
fn file_memory_follows_file_sizes() {
    let (mut fs, root) = fs_with_root();
    // Grown to the cap and cut, many times over: the memory must go back each time.
    for i in 0..40 {
        let f = fs.create_file(root, &alloc::format!("f{i}"), 0).unwrap();
        fs.set_size(f, 1 << 20, 0).unwrap();
        fs.set_size(f, 0, 0).unwrap();
        assert!(file_capacity(&fs) <= 1 << 20, "{}", file_capacity(&fs));
    }
    assert!(file_capacity(&fs) < 4096, "{}", file_capacity(&fs));
    // Appends stay amortised, within twice the size.
    let f = fs.create_file(root, "log", 0).unwrap();
    for i in 0..100_000u64 {
        fs.write(f, i, b"y", 0).unwrap();
        let cap = file_capacity(&fs);
        assert!(
            cap <= 2 * usize::try_from(i + 1).unwrap().max(8),
            "{i}: {cap}"
        );
    }
    fs.set_size(f, 10, 0).unwrap();
    assert!(file_capacity(&fs) <= 20);
}

#[test]
fn nothing_is_made_in_a_removed_directory() {
    let (mut fs, root) = fs_with_root();
    let d = fs.mkdir(root, "d", 0).unwrap();
    let keep = fs.create_file(root, "keep", 0).unwrap();
    fs.open(d).unwrap();
    fs.rmdir(root, "d", 0).unwrap();
    let before = fs.inode_count();
    // Linux answers ENOENT in a removed directory; here an entry made there would outlive it
    // unreachable, never freed.
    assert_eq!(fs.create_file(d, "x", 0), Err(Errno::NoEnt));
    assert_eq!(fs.mkdir(d, "x", 0), Err(Errno::NoEnt));
    assert_eq!(fs.symlink(d, "x", "t", 0), Err(Errno::NoEnt));
    assert_eq!(fs.link(keep, d, "x"), Err(Errno::NoEnt));
    assert_eq!(fs.rename(root, "keep", d, "x", 0), Err(Errno::NoEnt));
    assert_eq!(fs.inode_count(), before);
    assert!(fs.list(d).unwrap().is_empty());
    assert_eq!(fs.lookup(d, ".."), Err(Errno::Perm));
    assert_eq!(fs.lookup(d, "."), Ok(d));
    fs.close(d);
    assert_eq!(fs.inode_count(), before - 1);
    assert_eq!(names(&fs, root), ["keep"]);
    assert_well_formed(&fs.export(0).unwrap());
}

#[test]
fn no_path_gets_longer_than_max_path_however_it_is_made() {
    let (mut fs, root) = fs_with_root();
    // Each level made relative to the one above: no path argument is ever long, but the
    // paths the host would get back grow 256 bytes a level.
    let name = "n".repeat(tree::MAX_NAME);
    let mut chain = vec![root];
    loop {
        let top = *chain.last().unwrap();
        match fs.mkdir(top, &name, 0) {
            Ok(d) => chain.push(d),
            Err(e) => {
                assert_eq!(e, Errno::NameTooLong);
                break;
            }
        }
    }
    // 16 levels make 16 * 256 - 1 = 4095 bytes; nothing fits below.
    assert_eq!(chain.len(), 17);
    let bottom = chain[16];
    assert_eq!(fs.create_file(bottom, "x", 0), Err(Errno::NameTooLong));
    assert_eq!(fs.symlink(bottom, "x", "y", 0), Err(Errno::NameTooLong));
    let f = fs.create_file(root, "f", 0).unwrap();
    assert_eq!(fs.link(f, bottom, "x"), Err(Errno::NameTooLong));
    assert_eq!(
        fs.rename(root, "f", bottom, "x", 0),
        Err(Errno::NameTooLong)
    );
    // Moving the chain 2 bytes deeper is refused; moving it up under a short name makes room.
    let a = fs.mkdir(root, "a", 0).unwrap();
    assert_eq!(fs.rename(root, &name, a, &name, 0), Err(Errno::NameTooLong));
    fs.rename(root, &name, root, "s", 0).unwrap();
    // The bottom's path is now 4095 - 254 = 3841 bytes: a 254-byte name fills it to 4096.
    let fill = "x".repeat(254);
    fs.create_file(bottom, &fill, 0).unwrap();
    // And back down again (2 bytes deeper) is refused now that the bottom is full.
    assert_eq!(fs.rename(root, "s", a, "s", 0), Err(Errno::NameTooLong));
    fs.unlink(bottom, &fill, 0).unwrap();
    fs.rename(root, "s", a, "s", 0).unwrap();
    assert_eq!(fs.create_file(bottom, &fill, 0), Err(Errno::NameTooLong));
    fs.create_file(bottom, &fill[2..], 0).unwrap();
    let entries = fs.export(0).unwrap();
    assert_well_formed(&entries);
    assert_eq!(entries.len(), 3 + 16);
}

#[test]
fn deep_trees_export_and_drop_on_a_small_stack() {
    extern crate std;
    // 2048 levels of one-letter names: the deepest path is 4095 bytes. A recursive walk or
    // drop would need far more than 64 KiB of stack for it.
    let worker = std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(|| {
            let mut fs = Fs::new(Limits {
                max_bytes: 1 << 20,
                max_inodes: 3000,
            });
            let root = fs.add_root(0).unwrap();
            let mut d = root;
            for _ in 0..2048 {
                d = fs.mkdir(d, "d", 0).unwrap();
            }
            assert_eq!(fs.mkdir(d, "d", 0), Err(Errno::NameTooLong));
            assert_eq!(fs.lookup(root, &"d/".repeat(2048)), Ok(d));
            assert_eq!(
                fs.lookup(root, &"d/".repeat(2047)),
                Ok(fs.parent(d).unwrap())
            );
            let entries = fs.export(0).unwrap();
            assert_eq!(entries.len(), 2048);
            assert_well_formed(&entries);
            drop(fs);
        })
        .unwrap();
    worker.join().unwrap();
}

#[test]
fn hostile_sequences_still_export_a_well_formed_tree() {
    let (mut fs, root) = fs_with_root();
    fs.load(
        0,
        vec![
            dir("a"),
            dir("a/b"),
            file("a/b/f", b"loaded"),
            file("top", b"t"),
        ],
        0,
    )
    .unwrap();
    let a = fs.lookup(root, "a").unwrap();
    let b = fs.lookup(root, "a/b").unwrap();
    let f = fs.lookup(root, "a/b/f").unwrap();
    // A directory into itself or below: EINVAL, whatever the order of names.
    assert_eq!(fs.rename(root, "a", b, "a", 0), Err(Errno::Inval));
    assert_eq!(fs.rename(root, "a", a, "x", 0), Err(Errno::Inval));
    assert_eq!(fs.rename(a, "b", b, "b", 0), Err(Errno::Inval));
    // Hard links to directories: EPERM.
    assert_eq!(fs.link(a, root, "alias"), Err(Errno::Perm));
    // A hard link to a loaded file, then moves and removals around it.
    fs.link(f, root, "hard").unwrap();
    fs.rename(a, "b", root, "b2", 0).unwrap();
    fs.rename(root, "top", b, "top", 0).unwrap();
    fs.symlink(b, "up", "../..", 0).unwrap();
    fs.symlink(root, "out", "../outside", 0).unwrap();
    assert_eq!(fs.lookup(root, "b2/up"), Err(Errno::Perm));
    assert_eq!(fs.lookup(root, "out"), Err(Errno::Perm));
    fs.rmdir(root, "a", 0).unwrap();
    let entries = fs.export(0).unwrap();
    assert_well_formed(&entries);
    let find = |p: &str| entries.iter().find(|e| e.path == p).map(|e| e.node.clone());
    // Both names carry the bytes, since neither is the loaded path any more.
    assert_eq!(find("hard"), Some(Node::File(b"loaded".to_vec())));
    assert_eq!(find("b2/f"), Some(Node::File(b"loaded".to_vec())));
    assert_eq!(find("b2/top"), Some(Node::File(b"t".to_vec())));
    assert_eq!(find("b2/up"), Some(Node::Symlink("../..".into())));
    assert_eq!(find("a"), None);
}
