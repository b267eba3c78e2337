//! Unit tests of reading shared directories and writing the tool's changes back.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

fn open(root: &Path) -> HostDir {
    HostDir::open(root).unwrap()
}

/// Opens and reads `root`, as `bulwark run` does.
/// Reads `root` as a `--dir` and returns its tree sorted by path, having checked that parents
/// come before their children and each directory's entries in the kernel's order.
fn read(root: &Path, budget: &mut Budget) -> anyhow::Result<Vec<Entry>> {
    let mut tree = read_tree(&HostDir::open(root)?, budget)?;
    assert_host_order(root, &tree);
    tree.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(tree)
}

/// Asserts that `tree` (read from `root`) lists parents before children, and the entries of each
/// directory in the order `readdir` gives them, which is the order the tool will list them in.
fn assert_host_order(root: &Path, tree: &[Entry]) {
    let mut seen = std::collections::BTreeSet::new();
    let mut children: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for entry in tree {
        let (parent, name) = entry.path.rsplit_once('/').unwrap_or(("", &entry.path));
        assert!(
            parent.is_empty() || seen.contains(parent),
            "{} comes before its parent",
            entry.path
        );
        seen.insert(entry.path.as_str());
        children.entry(parent).or_default().push(name.to_owned());
    }
    for (dir, names) in children {
        let listed: Vec<String> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names, listed,
            "the entries of `{dir}` are not in readdir order"
        );
    }
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path; mkfifo only creates a file there.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// Runs `f` on this thread with `hook` called at each stage of reading a file.
fn with_hook<T>(hook: impl FnMut(Stage, &CStr) + 'static, f: impl FnOnce() -> T) -> T {
    HOOK.with(|h| *h.borrow_mut() = Some(Box::new(hook)));
    let result = f();
    HOOK.with(|h| *h.borrow_mut() = None);
    result
}

/// What is at a path, for comparing whole trees.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Dir,
    File(String, u32),
    Link(PathBuf),
    Other,
}

/// Everything under `root` (links not followed), with file contents and permissions.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Seen> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Seen>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let seen = if meta.file_type().is_symlink() {
                Seen::Link(std::fs::read_link(&path).unwrap())
            } else if meta.is_dir() {
                walk(root, &path, out);
                Seen::Dir
            } else if meta.is_file() {
                let bytes = std::fs::read(&path).unwrap();
                Seen::File(
                    String::from_utf8_lossy(&bytes).into_owned(),
                    meta.permissions().mode(),
                )
            } else {
                Seen::Other
            };
            out.insert(rel, seen);
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
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
fn trees_are_read_in_the_hosts_order_with_parents_first() {
    let root = scratch("read");
    std::fs::create_dir_all(root.join("b/c")).unwrap();
    std::fs::write(root.join("b/c/deep.txt"), b"deep").unwrap();
    std::fs::write(root.join("a.txt"), b"a").unwrap();
    std::fs::write(root.join("b/z"), b"").unwrap();
    let mut budget = big_budget();
    let host = open(&root);
    let tree = read_tree(&host, &mut budget).unwrap();
    assert_host_order(&root, &tree);
    let mut sorted = tree.clone();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        sorted,
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
    // The same descriptor reads the same tree again.
    assert_eq!(read_tree(&host, &mut big_budget()).unwrap(), tree);
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn links_special_files_and_oversized_trees_are_refused() {
    let root = scratch("refuse");
    std::fs::create_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("d/link")).unwrap();
    let e = read(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("symbolic link") && e.contains("d/link"), "{e}");
    std::fs::remove_file(root.join("d/link")).unwrap();

    std::fs::write(root.join("d/big"), vec![0u8; 2048]).unwrap();
    let mut small = Budget {
        bytes: 1024,
        entries: 100,
    };
    let e = read(&root, &mut small).unwrap_err().to_string();
    assert!(e.contains("--max-dir-size"), "{e}");
    let mut few = Budget {
        bytes: 1 << 20,
        entries: 1,
    };
    let e = read(&root, &mut few).unwrap_err().to_string();
    assert!(e.contains("--max-dir-files"), "{e}");

    mkfifo(&root.join("fifo"));
    let e = read(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("not a regular file"), "{e}");
    let e = read(&root.join("d/big"), &mut big_budget())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a directory"), "{e}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn a_host_dir_that_is_a_link_is_refused() {
    let base = scratch("host-link");
    std::fs::create_dir(base.join("real")).unwrap();
    std::fs::write(base.join("real/f"), b"f").unwrap();
    std::os::unix::fs::symlink(base.join("real"), base.join("link")).unwrap();
    for spelling in ["link", "link/", "link/.", "link//"] {
        let e = HostDir::open(&base.join(spelling)).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{spelling}: {e}");
    }
    assert_eq!(
        read(&base.join("real/"), &mut big_budget()).unwrap(),
        vec![file("f", b"f")]
    );
    std::fs::remove_dir_all(base).unwrap();
}

/// Defect 1: a file swapped for a FIFO between the listing and the read must be refused, not
/// opened in a way that waits for a writer forever.
#[test]
fn a_file_swapped_for_a_fifo_after_it_was_listed_is_refused_without_blocking() {
    let root = scratch("fifo-swap");
    std::fs::write(root.join("a"), b"a").unwrap();
    std::fs::write(root.join("victim"), b"v").unwrap();
    let victim = root.join("victim");
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let (root, victim) = (root.clone(), victim.clone());
        std::thread::spawn(move || {
            let swap = move |stage, name: &CStr| {
                if stage == Stage::Listed && name == c"victim" {
                    std::fs::remove_file(&victim).unwrap();
                    mkfifo(&victim);
                }
            };
            let result = with_hook(swap, || read(&root, &mut big_budget()));
            let _ = tx.send(result.map_err(|e| e.to_string()));
        });
    }
    let result = rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| {
            // Let the stuck reader go before failing.
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&victim);
            panic!("reading the tree blocked on a FIFO swapped in after the listing");
        });
    let e = result.expect_err("a FIFO was read as a file");
    assert!(
        e.contains("not a regular file") && e.contains("victim"),
        "{e}"
    );
    std::fs::remove_dir_all(root).unwrap();
}

/// Defect 1: the open-once reader refuses FIFOs, devices and links at once and reads nothing
/// from them.
#[test]
fn the_open_once_reader_refuses_fifos_devices_and_links_without_blocking() {
    let root = scratch("open-once");
    mkfifo(&root.join("fifo"));
    std::os::unix::fs::symlink("/dev/zero", root.join("link")).unwrap();
    std::fs::write(root.join("file"), b"bytes").unwrap();
    let dir = open(&root);
    let at = dir.fd.as_fd();
    let started = Instant::now();
    assert_eq!(
        read_file_at(at, c"fifo", 1 << 20).unwrap(),
        FileRead::NotRegular
    );
    assert_eq!(read_file_at(at, c"link", 1 << 20).unwrap(), FileRead::Link);
    assert_eq!(
        read_file_at(at, c"file", 1 << 20).unwrap(),
        FileRead::Bytes(b"bytes".to_vec())
    );
    assert_eq!(
        read_file_at(at, c"file", 4).unwrap(),
        FileRead::TooBig {
            size: 5,
            grew: false
        }
    );
    // The real /dev/zero and /dev/null: opened without blocking, refused without a read.
    let dev = open(Path::new("/dev"));
    for node in [c"zero", c"null", c"urandom"] {
        assert_eq!(
            read_file_at(dev.fd.as_fd(), node, 1 << 20).unwrap(),
            FileRead::NotRegular,
            "{node:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    std::fs::remove_dir_all(root).unwrap();
}

/// Defect 1: a file that grows after its size was taken is read no further than the budget.
#[test]
fn a_file_that_grows_while_it_is_read_cannot_take_more_than_the_budget() {
    let root = scratch("grows");
    let grows = root.join("grows");
    std::fs::write(&grows, vec![b'a'; 1000]).unwrap();
    let append = |path: PathBuf, bytes: usize| {
        move |stage, name: &CStr| {
            if stage == Stage::Opened && name == c"grows" {
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                f.write_all(&vec![b'b'; bytes]).unwrap();
            }
        }
    };
    let mut budget = Budget {
        bytes: 4096,
        entries: 10,
    };
    let e = with_hook(append(grows.clone(), 1 << 20), || read(&root, &mut budget))
        .expect_err("a file read past the budget");
    let e = e.to_string();
    assert!(
        e.contains("--max-dir-size") && e.contains("at least"),
        "{e}"
    );

    // Growing within the budget is fine, and charged for what was read.
    std::fs::write(&grows, vec![b'a'; 1000]).unwrap();
    let mut budget = Budget {
        bytes: 4096,
        entries: 10,
    };
    let tree = with_hook(append(grows.clone(), 1000), || read(&root, &mut budget)).unwrap();
    let [
        Entry {
            node: Node::File(bytes),
            ..
        },
    ] = &tree[..]
    else {
        panic!("{tree:?}");
    };
    assert_eq!(bytes.len(), 2000);
    assert_eq!(budget.bytes, 4096 - 2000);
    std::fs::remove_dir_all(root).unwrap();
}

/// Reading holds no descriptor per level, so a deep tree does not run out of descriptors.
#[test]
fn a_deep_tree_is_read_without_a_descriptor_per_level() {
    let root = scratch("deep");
    let deep = (0..600).fold(root.clone(), |p, _| p.join("d"));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("leaf"), b"leaf").unwrap();
    let open_fds = std::rc::Rc::new(std::cell::Cell::new(0));
    let seen = open_fds.clone();
    let count = move |_, name: &CStr| {
        if name == c"leaf" {
            seen.set(std::fs::read_dir("/proc/self/fd").unwrap().count());
        }
    };
    let mut budget = Budget {
        bytes: 1 << 20,
        entries: 1000,
    };
    let tree = with_hook(count, || read(&root, &mut budget)).unwrap();
    assert_eq!(tree.len(), 601);
    assert_eq!(
        tree.last(),
        Some(&file(&format!("{}leaf", "d/".repeat(600)), b"leaf"))
    );
    assert!(open_fds.get() < 300, "{} descriptors open", open_fds.get());
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
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
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
    let changes = write_back(&host, &before, &after).unwrap();
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
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    for after in [
        vec![file("../escape", b"x")],
        vec![file("/etc/evil", b"x")],
        vec![file("a/b", b"x")],
        vec![file("f", b"1"), file("f", b"2")],
        vec![unchanged("never-sent")],
        vec![file("f", b"x"), file("f/g", b"y")],
        vec![file("a\0b", b"x")],
    ] {
        assert!(write_back(&host, &before, &after).is_err(), "{after:?}");
        assert_eq!(std::fs::read(root.join("f")).unwrap(), b"f", "{after:?}");
    }
    // A directory swapped for a link on the host during the call is not written through.
    std::fs::create_dir(root.join("d")).unwrap();
    let before = read_tree(&host, &mut big_budget()).unwrap();
    std::fs::remove_dir(root.join("d")).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("d")).unwrap();
    let after = vec![dir("d"), file("d/planted", b"x"), unchanged("f")];
    assert!(write_back(&host, &before, &after).is_err());
    assert!(!outside.join("planted").exists());
    std::fs::remove_dir_all(root).unwrap();
    std::fs::remove_dir_all(outside).unwrap();
}

/// Defect 7: HOST itself moved away and replaced by a link to another directory during the call.
#[test]
fn a_host_dir_replaced_by_a_link_during_the_call_is_not_written_through() {
    let base = scratch("host-replaced");
    let (host_path, outside) = (base.join("host"), base.join("outside"));
    std::fs::create_dir(&host_path).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(host_path.join("f"), b"f").unwrap();
    std::fs::write(outside.join("f"), b"sentinel").unwrap();
    let host = open(&host_path);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    let outside_before = snapshot(&outside);

    std::fs::rename(&host_path, base.join("moved")).unwrap();
    std::os::unix::fs::symlink(&outside, &host_path).unwrap();
    let after = vec![file("f", b"changed"), file("planted", b"x")];
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("no longer the directory that was shared"), "{e}");
    assert_eq!(snapshot(&outside), outside_before);
    assert_eq!(std::fs::read(base.join("moved/f")).unwrap(), b"f");

    // Removed during the call: nothing is written either.
    std::fs::remove_file(&host_path).unwrap();
    std::fs::remove_dir_all(base.join("moved")).unwrap();
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("no longer the directory that was shared"), "{e}");
    assert_eq!(snapshot(&outside), outside_before);
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn directories_below_host_are_opened_without_following_links_with_and_without_openat2() {
    let base = scratch("beneath");
    let root = base.join("root");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::create_dir(base.join("outside")).unwrap();
    std::os::unix::fs::symlink(base.join("outside"), root.join("l")).unwrap();
    std::os::unix::fs::symlink("b", root.join("a/rel")).unwrap();
    std::os::unix::fs::symlink("../..", root.join("a/up")).unwrap();
    let host = open(&root);
    for fallback in [false, true] {
        NO_OPENAT2.with(|f| f.set(fallback));
        let at = host.fd.as_fd();
        let fd = open_dir_beneath(at, "a/b").unwrap();
        assert!(sys::fstat(fd.as_fd()).unwrap().is_dir());
        for linked in ["l", "a/rel", "a/up", "a/up/outside", "l/x"] {
            // ELOOP for a link on the way, ENOTDIR for one at the end (O_DIRECTORY).
            let e = open_dir_beneath(at, linked).unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENOTDIR)),
                "{fallback} {linked}: {e}"
            );
        }
        let e = open_dir_beneath(at, "a/missing").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
    NO_OPENAT2.with(|f| f.set(false));
    std::fs::remove_dir_all(base).unwrap();
}

/// Swaps the directory `real` for a link to `target` and back, over and over, on its own
/// thread, until dropped (then `real` is the directory again).
struct Swapper {
    stop: Arc<AtomicBool>,
    swaps: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Swapper {
    fn start(real: PathBuf, aside: PathBuf, target: PathBuf) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, swaps) = (stop.clone(), swaps.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::fs::rename(&real, &aside).unwrap();
                    std::os::unix::fs::symlink(&target, &real).unwrap();
                    swaps.fetch_add(1, Ordering::Relaxed);
                    std::thread::yield_now();
                    std::fs::remove_file(&real).unwrap();
                    std::fs::rename(&aside, &real).unwrap();
                    // Long enough in place for some write-backs to get through.
                    std::thread::sleep(Duration::from_micros(50));
                }
            })
        };
        Self {
            stop,
            swaps,
            thread: Some(thread),
        }
    }

    /// Stops swapping; how many swaps there were.
    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the swapper failed");
        }
        self.swaps.load(Ordering::Relaxed)
    }
}

impl Drop for Swapper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Two states of a directory whose write-backs from one to the other create, change and remove
/// files and directories.
fn states(prefix: &str) -> (Vec<Entry>, Vec<Entry>) {
    let p = |path: &str| {
        if prefix.is_empty() {
            path.to_owned()
        } else {
            format!("{prefix}/{path}")
        }
    };
    let mut a = Vec::new();
    let mut b = Vec::new();
    if !prefix.is_empty() {
        a.push(dir(prefix));
        b.push(dir(prefix));
    }
    a.extend([
        dir(&p("deep")),
        file(&p("deep/x"), b"state a x"),
        link(&p("deep/up"), "../keep"),
        file(&p("edit"), b"state a"),
        file(&p("gone"), b"only in a"),
        file(&p("keep"), b"keep"),
        link(&p("link"), "keep"),
        link(&p("oldlink"), "deep/x"),
    ]);
    b.extend([
        file(&p("edit"), b"state b"),
        file(&p("keep"), b"keep"),
        link(&p("link"), "edit"),
        file(&p("new"), b"only in b"),
        dir(&p("newdir")),
        link(&p("newdir/back"), "../new"),
        file(&p("newdir/y"), b"state b y"),
        file(&p("oldlink"), b"a file in b"),
    ]);
    (a, b)
}

/// A directory outside HOST holding files with the names the write-backs use.
fn sentinels(outside: &Path) {
    std::fs::create_dir_all(outside.join("deep")).unwrap();
    for name in [
        "deep/x", "deep/up", "edit", "gone", "keep", "link", "new", "oldlink", "sentinel",
    ] {
        std::fs::write(outside.join(name), format!("outside: {name}")).unwrap();
    }
    std::fs::set_permissions(outside.join("edit"), std::fs::Permissions::from_mode(0o640)).unwrap();
}

/// Writes back from one state to the other and back while the swapper runs; how many of the
/// write-backs succeeded.
fn race(host: &HostDir, a: &[Entry], b: &[Entry]) -> u32 {
    let started = Instant::now();
    let (mut rounds, mut ok) = (0u32, 0u32);
    while rounds < 300 || (ok < 10 && started.elapsed() < Duration::from_secs(20)) {
        let (before, after) = if rounds % 2 == 0 { (a, b) } else { (b, a) };
        if write_back(host, before, after).is_ok() {
            ok += 1;
        }
        rounds += 1;
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
    eprintln!("{rounds} write-backs, {ok} complete");
    ok
}

/// Defect 7: a subdirectory of HOST swapped for a link to a directory outside, and back, while
/// write-backs run: nothing outside is created, changed or removed (with `openat2` and with the
/// component-by-component fallback).
#[test]
fn racing_swaps_of_a_subdirectory_never_lead_the_write_back_outside() {
    for fallback in [false, true] {
        race_swaps(
            &format!("race-sub-{fallback}"),
            "sub",
            "host/sub",
            "host/.sub-aside",
            fallback,
        );
    }
}

/// Defect 7: HOST itself swapped (through its parent) for a link to a directory outside, and
/// back, while write-backs run: nothing outside is created, changed or removed.
#[test]
fn racing_swaps_of_the_host_dir_never_lead_the_write_back_outside() {
    race_swaps("race-host", "", "host", "host-aside", false);
}

/// In a new scratch `name` holding HOST (`host`) and a directory outside it: swaps `swapped`
/// (moved to `aside`) for a link to the outside directory and back while write-backs between
/// two states of `sub` run (with the component-by-component walk when `fallback`), and checks
/// that nothing outside was created, changed or removed.
fn race_swaps(name: &str, sub: &str, swapped: &str, aside: &str, fallback: bool) {
    let base = scratch(name);
    let (root, outside) = (base.join("host"), base.join("outside"));
    sentinels(&outside);
    let (a, b) = states(sub);
    std::fs::create_dir(&root).unwrap();
    materialize(&root, &a).unwrap();
    let outside_before = snapshot(&outside);
    let host = open(&root);
    NO_OPENAT2.with(|f| f.set(fallback));
    let swapper = Swapper::start(base.join(swapped), base.join(aside), outside.clone());
    let ok = race(&host, &a, &b);
    let swaps = swapper.stop();
    NO_OPENAT2.with(|f| f.set(false));
    assert_eq!(
        snapshot(&outside),
        outside_before,
        "a write-back reached outside HOST (fallback: {fallback})"
    );
    let names: Vec<_> = std::fs::read_dir(&base)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(swaps > 0 && ok > 0, "swaps {swaps}, write-backs {ok}");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn materialized_trees_read_back_identically() {
    let root = scratch("materialize");
    let tree = vec![dir("a"), file("a/b", b"bytes"), file("c", b"")];
    materialize(&root, &tree).unwrap();
    assert_eq!(
        read(&root, &mut big_budget()).unwrap(),
        tree,
        "tree is sorted by path"
    );
    assert!(materialize(&root, &[file("../x", b"")]).is_err());
    std::fs::remove_dir_all(root).unwrap();
}

fn link(path: &str, target: &str) -> Entry {
    Entry {
        path: path.into(),
        node: Node::Symlink(target.into()),
    }
}

fn symlink(target: &str, at: &Path) {
    std::os::unix::fs::symlink(target, at).unwrap();
}

/// The rule a link's target must pass, on its own: relative, never above the root, `..` only
/// out of a directory of the tree.
#[test]
fn a_link_target_passes_only_when_it_stays_inside_the_tree() {
    let tree = vec![
        dir("a"),
        dir("a/b"),
        file("a/b/f", b""),
        link("a/l", "b"),
        dir("c"),
    ];
    let dirs = DirIndex::new(&tree);
    let check = |path: &str, target: &str| check_link(path, target, &dirs);
    for (path, target) in [
        ("x", "a/b/f"),
        ("x", "a"),
        ("x", "./a/./b/"),
        ("x", "missing"),
        ("x", "missing/deeper"),
        ("x", "a/l/f"),
        ("x", "a/../c"),
        ("x", "a/b/../../c"),
        ("a/x", ".."),
        ("a/x", "../c"),
        ("a/b/x", "../../a/b/f"),
        ("a/b/x", "f"),
        ("x", "x"),
    ] {
        assert_eq!(check(path, target), Ok(()), "{path} -> {target}");
    }
    for (path, target, why) in [
        ("x", "", "empty"),
        ("x", "/etc/passwd", "absolute"),
        ("a/x", "/a", "absolute"),
        ("x", "..", "above"),
        ("x", "../x", "above"),
        ("a/x", "../..", "above"),
        ("a/b/x", "../../../etc", "above"),
        ("x", "a/b/../../..", "above"),
        // `a/l` is a link: where its `..` leads is not the tree's business.
        ("x", "a/l/..", "not a directory"),
        ("x", "a/l/../..", "not a directory"),
        ("x", "a/b/f/..", "not a directory"),
        ("x", "missing/..", "not a directory"),
        ("x", "a\0b", "NUL"),
    ] {
        let e = check(path, target).expect_err(&format!("{path} -> {target}"));
        assert!(e.contains(why), "{path} -> {target}: {e}");
    }
    let long = "a/".repeat(MAX_TARGET / 2 + 1);
    assert!(check("x", &long).unwrap_err().contains("longer"));
    assert_eq!(check("x", &"a/".repeat(MAX_TARGET / 2)), Ok(()));
}

#[test]
fn links_that_stay_inside_are_carried_as_links_and_never_followed() {
    let base = scratch("links-in");
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"outside").unwrap();
    std::fs::write(root.join("d/f"), b"f").unwrap();
    symlink("d/f", &root.join("to-file"));
    symlink("d", &root.join("to-dir"));
    symlink("nowhere", &root.join("dangling"));
    symlink("..", &root.join("d/up"));
    symlink("../../d/f", &root.join("d/e/back"));
    symlink("to-dir/e", &root.join("via-link"));
    let mut budget = big_budget();
    let tree = read(&root, &mut budget).unwrap();
    assert_eq!(
        tree,
        vec![
            dir("d"),
            dir("d/e"),
            link("d/e/back", "../../d/f"),
            file("d/f", b"f"),
            link("d/up", ".."),
            link("dangling", "nowhere"),
            link("to-dir", "d"),
            link("to-file", "d/f"),
            link("via-link", "to-dir/e"),
        ],
        "links are carried, and nothing is read through `to-dir` or `d/up`"
    );
    // Every link is an entry; only the one file's bytes count.
    assert_eq!(budget.entries, 100 - 9);
    assert_eq!(budget.bytes, (1 << 20) - 1);
    let mut few = Budget {
        bytes: 1 << 20,
        entries: 8,
    };
    assert!(
        read(&root, &mut few)
            .unwrap_err()
            .to_string()
            .contains("--max-dir-files")
    );

    // Read back from a copy made by materialize: the same tree, the same links on disk.
    let copy = base.join("copy");
    std::fs::create_dir(&copy).unwrap();
    materialize(&copy, &tree).unwrap();
    assert_eq!(read(&copy, &mut big_budget()).unwrap(), tree);
    assert_eq!(snapshot(&copy), snapshot(&root));
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn links_that_lead_out_or_are_absolute_are_refused_when_read() {
    let base = scratch("links-out");
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(root.join("d/e")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    symlink("..", &root.join("d/e/up"));
    for (at, target, why) in [
        ("esc", "../outside", "leads above"),
        ("d/esc", "../../outside/secret", "leads above"),
        ("d/e/esc", "../../..", "leads above"),
        ("abs", "/etc/passwd", "absolute"),
        ("d/abs", &*outside.to_string_lossy(), "absolute"),
        // `d/e/up` is `..` (inside), so `d/e/up/..` is HOST's parent: lexically it looks inside.
        ("sneaky", "d/e/up/..", "not a directory"),
    ] {
        symlink(target, &root.join(at));
        let e = read(&root, &mut big_budget()).unwrap_err().to_string();
        assert!(
            e.contains("symbolic link") && e.contains(at) && e.contains(why),
            "{at} -> {target}: {e}"
        );
        std::fs::remove_file(root.join(at)).unwrap();
    }
    assert!(read(&root, &mut big_budget()).is_ok());
    // A target that is not UTF-8 cannot be carried.
    std::os::unix::fs::symlink(OsStr::from_bytes(b"d/\xff"), root.join("bytes")).unwrap();
    let e = read(&root, &mut big_budget()).unwrap_err().to_string();
    assert!(e.contains("bytes") && e.contains("not UTF-8"), "{e}");
    std::fs::remove_dir_all(base).unwrap();
}

/// A file swapped for a link after it was listed is not read through the link.
#[test]
fn a_file_swapped_for_a_link_after_it_was_listed_is_refused() {
    let base = scratch("link-swap");
    let root = base.join("root");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(base.join("secret"), b"outside").unwrap();
    std::fs::write(root.join("victim"), b"v").unwrap();
    let victim = root.join("victim");
    let swap = move |stage, name: &CStr| {
        if stage == Stage::Listed && name == c"victim" {
            std::fs::remove_file(&victim).unwrap();
            symlink("../secret", &victim);
        }
    };
    let e = with_hook(swap, || read(&root, &mut big_budget()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("changed while it was being read"), "{e}");
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn links_are_written_back_created_replaced_and_removed() {
    let root = scratch("links-back");
    std::fs::create_dir(root.join("d")).unwrap();
    std::fs::write(root.join("d/f"), b"f").unwrap();
    std::fs::write(root.join("file-to-link"), b"was a file").unwrap();
    symlink("d/f", &root.join("same"));
    symlink("d/f", &root.join("retarget"));
    symlink("d/f", &root.join("gone"));
    symlink("d/f", &root.join("link-to-file"));
    symlink("d/f", &root.join("link-to-dir"));
    std::fs::create_dir(root.join("dir-to-link")).unwrap();
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    let same_before = std::fs::symlink_metadata(root.join("same")).unwrap().ino();

    let after = vec![
        dir("d"),
        unchanged("d/f"),
        link("d/new", "f"),
        link("dir-to-link", "d"),
        link("file-to-link", "d/new"),
        dir("link-to-dir"),
        file("link-to-file", b"now a file"),
        link("retarget", "d"),
        link("same", "d/f"),
        link("top-new", "d/missing"),
    ];
    let changes = write_back(&host, &before, &after).unwrap();
    assert_eq!(
        changes,
        Changes {
            files_written: 6,
            dirs_created: 1,
            removed: 3,
        }
    );
    let expected: BTreeMap<PathBuf, Seen> = [
        ("d", Seen::Dir),
        ("d/f", Seen::File("f".into(), 0o100644)),
        ("d/new", Seen::Link("f".into())),
        ("dir-to-link", Seen::Link("d".into())),
        ("file-to-link", Seen::Link("d/new".into())),
        ("link-to-dir", Seen::Dir),
        ("retarget", Seen::Link("d".into())),
        ("same", Seen::Link("d/f".into())),
        ("top-new", Seen::Link("d/missing".into())),
    ]
    .into_iter()
    .map(|(p, s)| (PathBuf::from(p), s))
    .collect();
    let mut now = snapshot(&root);
    // The new file's permissions come from the umask; only its contents are compared.
    assert!(matches!(
        now.remove(Path::new("link-to-file")),
        Some(Seen::File(s, _)) if s == "now a file"
    ));
    if let Some(Seen::File(_, mode)) = now.get_mut(Path::new("d/f")) {
        *mode = 0o100644;
    }
    assert_eq!(now, expected);
    assert_eq!(
        std::fs::symlink_metadata(root.join("same")).unwrap().ino(),
        same_before,
        "an unchanged link is not remade"
    );
    // The write-back wrote through no link: d/f is as it was.
    assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"f");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn hostile_link_answers_are_refused_before_anything_is_written() {
    let base = scratch("links-hostile");
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(root.join("s/d")).unwrap();
    std::fs::create_dir_all(outside.join("etc")).unwrap();
    std::fs::write(outside.join("etc/passwd"), b"outside").unwrap();
    std::fs::write(root.join("f"), b"f").unwrap();
    // Inside today: s/d/.. is s, s/.. is HOST.
    symlink("d/../..", &root.join("s/l"));
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    let host_before = snapshot(&root);
    let outside_before = snapshot(&outside);
    let base_names = || {
        let mut names: Vec<_> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        names
    };
    let names_before = base_names();
    let keep = || {
        vec![
            file("f", b"changed"),
            dir("s"),
            dir("s/d"),
            link("s/l", "d/../.."),
        ]
    };
    let with = |extra: Vec<Entry>| {
        let mut after = keep();
        after.extend(extra);
        after
    };
    for (after, why) in [
        (with(vec![link("a", "../outside/etc")]), "leads above"),
        (with(vec![link("a", "../../etc")]), "leads above"),
        // The classic: a link out, then a file through it.
        (
            with(vec![link("a", "../outside/etc"), file("a/passwd", b"evil")]),
            "",
        ),
        // Even a link that stays inside is no directory to write through.
        (with(vec![link("a", "s"), file("a/planted", b"x")]), ""),
        (with(vec![link("a", "/etc")]), "absolute"),
        (with(vec![link("a", "")]), "empty"),
        (with(vec![link("a", "x\0y")]), "NUL"),
        (with(vec![link("a", &"x/".repeat(3000))]), "longer"),
        (with(vec![link("a", "s/d/../../..")]), "leads above"),
        // Turns s/d into a link to `..`: then the old link s/l (d/../..) leads above HOST.
        (
            vec![
                file("f", b"changed"),
                dir("s"),
                link("s/d", ".."),
                link("s/l", "d/../.."),
            ],
            "not a directory",
        ),
        (with(vec![link("s/d/x", "../l/..")]), "not a directory"),
    ] {
        let e = write_back(&host, &before, &after)
            .expect_err(&format!("{after:?}"))
            .to_string();
        assert!(e.contains(why), "{after:?}: {e}");
        assert_eq!(snapshot(&root), host_before, "{after:?}");
        assert_eq!(snapshot(&outside), outside_before, "{after:?}");
        assert_eq!(base_names(), names_before, "{after:?}");
    }
    std::fs::remove_dir_all(base).unwrap();
}

/// Something on the host swaps a file or directory for a link during the call: the write-back
/// neither writes through it nor replaces it.
#[test]
fn links_put_on_the_host_during_the_call_are_not_written_through() {
    let base = scratch("links-swapped");
    let (root, outside) = (base.join("root"), base.join("outside"));
    std::fs::create_dir_all(root.join("d")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("x"), b"outside").unwrap();
    std::fs::write(root.join("f"), b"f").unwrap();
    symlink("f", &root.join("l"));
    let host = open(&root);
    let before = read_tree(&host, &mut big_budget()).unwrap();
    let outside_before = snapshot(&outside);
    let outside_x = outside.join("x").to_string_lossy().into_owned();

    // A file the tool changed is now a link (to outside): not replaced, not written through.
    std::fs::remove_file(root.join("f")).unwrap();
    symlink(&outside_x, &root.join("f"));
    let after = vec![dir("d"), file("f", b"tool"), link("l", "f")];
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("changed on the host"), "{e}");
    assert_eq!(snapshot(&outside), outside_before);
    std::fs::remove_file(root.join("f")).unwrap();
    std::fs::write(root.join("f"), b"f").unwrap();

    // A link the tool retargets was made a directory: not replaced.
    std::fs::remove_file(root.join("l")).unwrap();
    std::fs::create_dir(root.join("l")).unwrap();
    let after = vec![dir("d"), unchanged("f"), link("l", "d")];
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("changed on the host"), "{e}");
    assert!(root.join("l").is_dir());
    std::fs::remove_dir(root.join("l")).unwrap();
    symlink("f", &root.join("l"));

    // A link the tool removed was made a file: not removed.
    std::fs::remove_file(root.join("l")).unwrap();
    std::fs::write(root.join("l"), b"host").unwrap();
    let after = vec![dir("d"), unchanged("f")];
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("changed on the host"), "{e}");
    assert_eq!(std::fs::read(root.join("l")).unwrap(), b"host");
    std::fs::remove_file(root.join("l")).unwrap();
    symlink("f", &root.join("l"));

    // The directory a new link goes in is now a link to outside: nothing is made there.
    std::fs::remove_dir(root.join("d")).unwrap();
    symlink(&outside.to_string_lossy(), &root.join("d"));
    let after = vec![
        dir("d"),
        link("d/x", "../f"),
        unchanged("f"),
        link("l", "f"),
    ];
    let e = write_back(&host, &before, &after).unwrap_err().to_string();
    assert!(e.contains("no longer a directory"), "{e}");
    assert_eq!(snapshot(&outside), outside_before);
    std::fs::remove_dir_all(base).unwrap();
}

#[test]
fn an_answer_larger_than_the_calls_limits_is_refused() {
    let budget = Budget {
        bytes: 10,
        entries: 3,
    };
    let fits = vec![
        vec![dir("d"), file("d/a", b"12345")],
        vec![Entry {
            path: "l".into(),
            node: Node::Symlink("abcde".into()),
        }],
    ];
    assert!(check_answer_size(&fits, budget).is_ok());
    let too_many = vec![vec![dir("d"), dir("e"), file("f", b""), unchanged("g")]];
    let e = check_answer_size(&too_many, budget).unwrap_err();
    assert!(e.to_string().contains("4 entries"), "{e}");
    let too_big = vec![vec![file("a", b"123456")], vec![file("b", b"12345")]];
    let e = check_answer_size(&too_big, budget).unwrap_err();
    assert!(e.to_string().contains("11 bytes"), "{e}");
}
