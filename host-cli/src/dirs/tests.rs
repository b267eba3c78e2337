//! Unit tests of reading shared directories and writing the tool's changes back.

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bulwark-dirs-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn big_budget() -> Budget {
    Budget {
        bytes: 1 << 20,
        entries: 100,
    }
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

fn unchanged(path: &str) -> Entry {
    Entry {
        path: path.into(),
        node: Node::Unchanged,
    }
}

#[test]
fn dir_arguments_parse() {
    assert_eq!(
        parse_dir("./data::/data"),
        Ok(DirSpec {
            host: "./data".into(),
            guest: "/data".into()
        })
    );
    assert_eq!(parse_dir("/srv/x").unwrap().guest, "/srv/x");
    assert!(parse_dir("::/x").is_err() && parse_dir("x::").is_err());
}

#[test]
fn trees_are_read_sorted_with_parents_first() {
    let root = scratch("read");
    std::fs::create_dir_all(root.join("b/c")).unwrap();
    std::fs::write(root.join("b/c/deep.txt"), b"deep").unwrap();
    std::fs::write(root.join("a.txt"), b"a").unwrap();
    std::fs::write(root.join("b/z"), b"").unwrap();
    let mut budget = big_budget();
    let tree = read_tree(&root, &mut budget).unwrap();
    assert_eq!(
        tree,
        vec![
            file("a.txt", b"a"),
            dir("b"),
            dir("b/c"),
            file("b/c/deep.txt", b"deep"),
            file("b/z", b""),
        ]
    );
    assert_eq!(budget.entries, 95);
    assert_eq!(budget.bytes, (1 << 20) - 5);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn links_special_files_and_oversized_trees_are_refused() {
    let root = scratch("refuse");
    std::fs::create_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("d/link")).unwrap();
    let e = read_tree(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("symbolic link") && e.contains("d/link"), "{e}");
    std::fs::remove_file(root.join("d/link")).unwrap();

    std::fs::write(root.join("d/big"), vec![0u8; 2048]).unwrap();
    let mut small = Budget {
        bytes: 1024,
        entries: 100,
    };
    let e = read_tree(&root, &mut small).unwrap_err().to_string();
    assert!(e.contains("--max-dir-size"), "{e}");
    let mut few = Budget {
        bytes: 1 << 20,
        entries: 1,
    };
    let e = read_tree(&root, &mut few).unwrap_err().to_string();
    assert!(e.contains("--max-dir-files"), "{e}");

    let fifo = root.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mkfifo only creates a file there.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let e = read_tree(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = read_tree(&root.join("d/big"), &mut big_budget())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn changes_are_written_back_and_nothing_else_is_touched() {
    let root = scratch("write-back");
    std::fs::create_dir_all(root.join("keep/sub")).unwrap();
    std::fs::create_dir(root.join("old")).unwrap();
    std::fs::write(root.join("keep/same"), b"same").unwrap();
    std::fs::write(root.join("keep/edit"), b"before").unwrap();
    std::fs::set_permissions(
        root.join("keep/edit"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(root.join("old/x"), b"x").unwrap();
    std::fs::write(root.join("kind"), b"file that becomes a directory").unwrap();
    let before = read_tree(&root, &mut big_budget()).unwrap();
    // Something on the host that was not shared (created after the copy) must survive.
    std::fs::write(root.join("keep/host-only"), b"mine").unwrap();
    let same_mtime = std::fs::metadata(root.join("keep/same"))
        .unwrap()
        .modified()
        .unwrap();

    let after = vec![
        dir("keep"),
        file("keep/edit", b"after"),
        unchanged("keep/same"),
        dir("keep/sub"),
        file("keep/sub/new", b"new"),
        dir("kind"),
        file("kind/inside", b"i"),
        dir("made"),
    ];
    let changes = write_back(&root, &before, &after).unwrap();
    assert_eq!(
        changes,
        Changes {
            files_written: 3,
            dirs_created: 2,
            removed: 3,
        }
    );
    let read = |p: &str| std::fs::read(root.join(p)).unwrap();
    assert_eq!(read("keep/edit"), b"after");
    assert_eq!(
        std::fs::metadata(root.join("keep/edit"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "a replaced file keeps its permissions"
    );
    assert_eq!(read("keep/same"), b"same");
    assert_eq!(
        std::fs::metadata(root.join("keep/same"))
            .unwrap()
            .modified()
            .unwrap(),
        same_mtime,
        "an unchanged file is not rewritten"
    );
    assert_eq!(read("keep/sub/new"), b"new");
    assert_eq!(read("kind/inside"), b"i");
    assert_eq!(read("keep/host-only"), b"mine");
    assert!(root.join("made").is_dir());
    assert!(!root.join("old").exists());
    let leftovers: Vec<_> = std::fs::read_dir(root.join("keep"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn hostile_answers_are_refused_before_anything_is_written() {
    let root = scratch("hostile");
    let outside = scratch("hostile-outside");
    std::fs::write(root.join("f"), b"f").unwrap();
    let before = read_tree(&root, &mut big_budget()).unwrap();
    for after in [
        vec![file("../escape", b"x")],
        vec![file("/etc/evil", b"x")],
        vec![file("a/b", b"x")],
        vec![file("f", b"1"), file("f", b"2")],
        vec![unchanged("never-sent")],
        vec![file("f", b"x"), file("f/g", b"y")],
        vec![file("a\0b", b"x")],
    ] {
        assert!(write_back(&root, &before, &after).is_err(), "{after:?}");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"f", "{after:?}");
    }
    // A directory swapped for a link on the host during the call is not written through.
    std::fs::create_dir(root.join("d")).unwrap();
    let before = read_tree(&root, &mut big_budget()).unwrap();
    std::fs::remove_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
    let after = vec![dir("d"), file("d/planted", b"x"), unchanged("f")];
    assert!(write_back(&root, &before, &after).is_err());
    assert!(!outside.join("planted").exists());
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(outside).unwrap();
}

#[test]
fn materialized_trees_read_back_identically() {
    let root = scratch("materialize");
    let tree = vec![dir("a"), file("a/b", b"bytes"), file("c", b"")];
    materialize(&root, &tree).unwrap();
    assert_eq!(read_tree(&root, &mut big_budget()).unwrap(), tree);
    assert!(materialize(&root, &[file("../x", b"")]).is_err());
    std::fs::remove_dir_all(root).unwrap();
}
