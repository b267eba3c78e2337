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
    let mut done = [0u32; 9];
    for step in 0..20_000u64 {
        let r = next();
        let path = NAMES[(next() % NAMES.len() as u64) as usize];
        let other = NAMES[(next() % NAMES.len() as u64) as usize];
        let size = match (r >> 16) % 4 {
            0 => 0,
            1 => (r >> 24) % 5000,
            2 => (r >> 24) % (80 << 10),
            _ => u64::MAX - (r >> 40),
        };
        match r % 9 {
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
            _ => {
                if let Some(ino) = open.pop() {
                    fs.close(ino);
                }
            }
        }
        // The books: bytes are exactly the live files' sizes, within the cap.
        let live: u64 = (1..fs.next_ino)
            .filter_map(|i| fs.stat(i).ok())
            .filter(|s| s.kind == Kind::File)
            .map(|s| s.size)
            .sum();
        assert_eq!(fs.bytes(), live, "step {step}");
        assert!(fs.bytes() <= 64 << 10, "step {step}");
        assert!(fs.inode_count() <= 40, "step {step}");
        assert!(fs.lookup(root, "..").is_err());
    }
    assert!(
        done[..7].iter().all(|&n| n > 20),
        "too few operations succeeded: {done:?}"
    );
    for ino in open.drain(..) {
        fs.close(ino);
    }
    // Removing everything frees everything.
    let _ = fs.export(0).unwrap();
}
