//! A WASI test tool for `bulwark run --dir`: works on the directory given as its first argument
//! with `std::fs` and prints one line per step, errors included, so the same transcript is
//! expected from every WASI implementation.
//!
//! `fs-tool DIR work` expects DIR to hold `in.txt` ("0123456789"), `log.txt`, `rename-me.txt`,
//! `delete-me.txt` and `old-dir/` with files; it reads, writes, renames, removes, appends,
//! seeks, truncates, lists, and tries things that must fail (a missing file, an existing
//! directory, a non-empty directory, a path above DIR). `fs-tool DIR write-then-exit N` writes
//! `out.txt` then exits with code N; `write-then-trap` writes then traps; `write-then-spin`
//! writes then loops forever. `fs-tool DIR fill MIB` writes MIB MiB to `big.bin` in 64 KiB
//! pieces and reports where it stopped.
//!
//! `fs-tool DIR links` expects DIR to hold `data.txt` ("data"), `sub/inner.txt` ("inner") and
//! the symbolic links `to-data -> data.txt`, `to-sub -> sub`, `dangling -> missing`,
//! `old -> data.txt` and `retarget -> data.txt`; it reads links and through them, makes,
//! retargets and removes links, and writes a file through one. `fs-tool DIR symlink TARGET
//! LINK` makes one link and writes `after.txt`.

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

fn show<T: std::fmt::Debug>(step: &str, r: std::io::Result<T>) {
    match r {
        Ok(v) => println!("{step}: ok {v:?}"),
        Err(e) => println!("{step}: error {:?}", e.kind()),
    }
}

fn listing(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        let kind = if file_type.is_dir() {
            "/"
        } else if file_type.is_symlink() {
            "@"
        } else {
            ""
        };
        names.push(format!("{}{kind}", entry.file_name().to_string_lossy()));
    }
    names.sort();
    Ok(names)
}

fn work(d: &Path) {
    show("list", listing(d));
    show("read in.txt", fs::read_to_string(d.join("in.txt")));
    show("len in.txt", fs::metadata(d.join("in.txt")).map(|m| (m.len(), m.is_file())));
    show("is_dir old-dir", fs::metadata(d.join("old-dir")).map(|m| m.is_dir()));
    show("write out.txt", fs::write(d.join("out.txt"), "written by the tool\n"));
    show("create_dir_all new/sub", fs::create_dir_all(d.join("new/sub")));
    show("write new/sub/deep.txt", fs::write(d.join("new/sub/deep.txt"), "deep\n"));
    show(
        "rename rename-me.txt new/renamed.txt",
        fs::rename(d.join("rename-me.txt"), d.join("new/renamed.txt")),
    );
    show("remove delete-me.txt", fs::remove_file(d.join("delete-me.txt")));
    show("remove_dir_all old-dir", fs::remove_dir_all(d.join("old-dir")));
    show(
        "append log.txt",
        OpenOptions::new()
            .append(true)
            .open(d.join("log.txt"))
            .and_then(|mut f| f.write_all(b"appended\n")),
    );
    show(
        "seek+read in.txt",
        fs::File::open(d.join("in.txt")).and_then(|mut f| {
            f.seek(SeekFrom::Start(3))?;
            let mut buf = [0u8; 4];
            f.read_exact(&mut buf)?;
            let end = f.seek(SeekFrom::End(-2))?;
            Ok((String::from_utf8_lossy(&buf).into_owned(), end))
        }),
    );
    show(
        "truncate out.txt to 7",
        OpenOptions::new()
            .write(true)
            .open(d.join("out.txt"))
            .and_then(|f| f.set_len(7)),
    );
    show(
        "overwrite in middle",
        OpenOptions::new()
            .write(true)
            .open(d.join("new/sub/deep.txt"))
            .and_then(|mut f| {
                f.seek(SeekFrom::Start(1))?;
                f.write_all(b"EE")
            }),
    );
    show("read missing", fs::read(d.join("missing.txt")));
    show("create_dir existing new", fs::create_dir(d.join("new")));
    show("remove_dir non-empty new", fs::remove_dir(d.join("new")));
    show("remove_file a directory", fs::remove_file(d.join("new")));
    show("read a directory", fs::read(d.join("new")));
    show("read above the dir", fs::read(d.join("../etc/passwd")));
    show(
        "create_new existing",
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(d.join("in.txt")),
    );
    show("write into a file as dir", fs::write(d.join("in.txt/x"), "x"));
    show("list new", listing(&d.join("new")));
    show("list", listing(d));
}

#[allow(deprecated)] // `std::fs::soft_link` is the stable way to make a link on WASI.
fn symlink(target: &str, link: &Path) -> std::io::Result<()> {
    fs::soft_link(target, link)
}

fn links(d: &Path) {
    show("list", listing(d));
    show("readlink to-data", fs::read_link(d.join("to-data")));
    show("read to-data", fs::read_to_string(d.join("to-data")));
    show("read to-sub/inner.txt", fs::read_to_string(d.join("to-sub/inner.txt")));
    show(
        "lstat to-sub",
        fs::symlink_metadata(d.join("to-sub")).map(|m| (m.is_symlink(), m.is_dir())),
    );
    show("stat to-sub", fs::metadata(d.join("to-sub")).map(|m| m.is_dir()));
    show("list to-sub", listing(&d.join("to-sub")));
    show("readlink dangling", fs::read_link(d.join("dangling")));
    show("read dangling", fs::read(d.join("dangling")));
    show("readlink data.txt", fs::read_link(d.join("data.txt")));
    show("symlink new-link", symlink("sub/inner.txt", &d.join("new-link")));
    show("read new-link", fs::read_to_string(d.join("new-link")));
    show("symlink existing", symlink("sub", &d.join("to-data")));
    show("remove old", fs::remove_file(d.join("old")));
    show("read data.txt after", fs::read_to_string(d.join("data.txt")));
    show("remove retarget", fs::remove_file(d.join("retarget")));
    show("symlink retarget", symlink("sub", &d.join("retarget")));
    show("symlink sub/up", symlink("..", &d.join("sub/up")));
    show("read sub/up/data.txt", fs::read_to_string(d.join("sub/up/data.txt")));
    show("symlink abs", symlink("/etc/passwd", &d.join("abs")));
    show("symlink loop", symlink("loop", &d.join("loop")));
    show("read loop", fs::read(d.join("loop")));
    show("write to-data", fs::write(d.join("to-data"), "written through a link"));
    show("list", listing(d));
    show("list sub", listing(&d.join("sub")));
}

fn walk(d: &Path, prefix: &str) {
    let entries = match fs::read_dir(d) {
        Ok(entries) => entries,
        Err(e) => return println!("{prefix}: error {:?}", e.kind()),
    };
    for entry in entries.flatten() {
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        println!("{name}{}", if is_dir { "/" } else { "" });
        if is_dir {
            walk(&entry.path(), &format!("{name}/"));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(dir), Some(mode)) = (args.get(1), args.get(2)) else {
        eprintln!(
            "usage: fs-tool DIR work|links|walk|symlink TARGET LINK|write-then-exit N|write-then-trap|write-then-spin|fill MIB"
        );
        std::process::exit(2);
    };
    let d = Path::new(dir);
    match mode.as_str() {
        "work" => work(d),
        "links" => links(d),
        // Each directory's entries in the order fd_readdir gives them, depth first, unsorted.
        "walk" => walk(d, ""),
        "symlink" => {
            let (Some(target), Some(link)) = (args.get(3), args.get(4)) else {
                eprintln!("usage: fs-tool DIR symlink TARGET LINK");
                std::process::exit(2);
            };
            show("symlink", symlink(target, &d.join(link)));
            show("write after.txt", fs::write(d.join("after.txt"), "after"));
        }
        "write-then-exit" => {
            show("write out.txt", fs::write(d.join("out.txt"), "should not survive\n"));
            show("remove in.txt", fs::remove_file(d.join("in.txt")));
            let code = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
            std::process::exit(code);
        }
        "write-then-spin" => {
            show("write out.txt", fs::write(d.join("out.txt"), "should not survive\n"));
            let mut x: u64 = 1;
            while x != 0 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
        }
        "write-then-trap" => {
            show("write out.txt", fs::write(d.join("out.txt"), "should not survive\n"));
            panic!("trapping after a write");
        }
        "fill" => {
            let mib: usize = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(1);
            let piece = vec![7u8; 64 << 10];
            let mut f = fs::File::create(d.join("big.bin")).expect("create big.bin");
            let mut written = 0usize;
            let mut result = Ok(());
            while written < mib << 20 {
                if let Err(e) = f.write_all(&piece) {
                    result = Err(e);
                    break;
                }
                written += piece.len();
            }
            println!("wrote {} KiB", written >> 10);
            show("fill", result);
        }
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}
