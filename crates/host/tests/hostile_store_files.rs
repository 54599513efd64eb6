//! A file store whose files were damaged, replaced or made links, by a crash or by
//! anyone else who writes there: what it holds is a copy only if it is the store's own
//! regular file with the content its name says, and a received file is the one written,
//! so a VM never runs on other bytes, nor on a file elsewhere.

use std::path::PathBuf;

use ferry_host::files::FileStore;
use ferry_host::{AttachDir, AttachPolicy};
use ferry_migrate::FileOffer;
use ferry_vmm::FileInfo;

fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A fresh folder for test `tag`: its store in `store`, attaching files from `attach`.
fn setup(tag: &str) -> (PathBuf, FileStore) {
    let d = ferry_testdata::scratch_dir("hostile-store").join(tag);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("attach")).unwrap();
    std::fs::create_dir_all(d.join("store")).unwrap();
    let attach = AttachPolicy::Under(vec![AttachDir::new(&d.join("attach")).unwrap()]);
    let store = FileStore::new(d.join("store"), attach);
    (d, store)
}

/// The offer of `content`, named `name`, from a source path this host never attaches.
fn offer(name: &str, content: &[u8]) -> FileOffer {
    FileOffer {
        name: name.into(),
        size: content.len() as u64,
        sha256: sha256(content),
        path: "/nonexistent/on/this/host".into(),
    }
}

/// Where `store` keeps `o`'s content.
fn stored(store: &FileStore, o: &FileOffer) -> PathBuf {
    store.dir().join(format!("sha256-{}", o.sha256))
}

/// The part files in `store`'s folder.
fn parts(store: &FileStore) -> Vec<PathBuf> {
    std::fs::read_dir(store.dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_str().unwrap();
            name.starts_with("incoming-") && name.ends_with(".part")
        })
        .collect()
}

/// Receives `content` for `o` into `store` and keeps it there, as a migration that
/// succeeded does.
fn receive_and_keep(store: &FileStore, o: &FileOffer, content: &[u8]) {
    let incoming = store.receive(&[o]).unwrap().pop().unwrap();
    incoming.write_at(0, content).unwrap();
    store.finish(incoming).unwrap().keep().unwrap();
}

#[test]
fn a_store_file_that_is_a_link_is_not_a_copy() {
    let (d, store) = setup("link");
    let content = b"the weights of a model".to_vec();
    let o = offer("model", &content);
    // The same content outside the store, and outside where this host attaches files
    // from: a link in the store must not make it a copy (nor make this host hash it).
    let outside = d.join("outside.gguf");
    std::fs::write(&outside, &content).unwrap();
    std::os::unix::fs::symlink(&outside, stored(&store, &o)).unwrap();
    assert!(store.find(&o).is_none(), "a link in the store was followed");

    // A file a VM here uses, that the link leads to, is still found, by its own path.
    let used = FileInfo {
        name: "model".into(),
        size: content.len() as u64,
        sha256: o.sha256.clone(),
        path: outside.clone(),
    };
    let knowing = store.clone().knowing(vec![used]);
    assert_eq!(knowing.find(&o).unwrap().info().path, outside);

    // Received, the file takes the link's name: the store's own file, found there.
    receive_and_keep(&store, &o, &content);
    let path = stored(&store, &o);
    assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    let found = store.find(&o).unwrap();
    assert_eq!(found.info().path, path);
    let mut back = vec![0u8; content.len()];
    found.read_at(0, &mut back).unwrap();
    assert_eq!(back, content);
    assert_eq!(std::fs::read(&outside).unwrap(), content);
}

#[test]
fn a_part_file_replaced_before_its_check_is_refused() {
    let (d, store) = setup("swapped-part");
    let content = vec![5u8; 64 << 10];
    let o = offer("data", &content);
    let outside = d.join("outside.bin");
    std::fs::write(&outside, &content).unwrap();
    for link in [true, false] {
        let incoming = store.receive(&[&o]).unwrap().pop().unwrap();
        incoming.write_at(0, &content).unwrap();
        // Replaced by a file with the right content that is not the one written (a link
        // to one elsewhere, or another file): checked, then kept in the store, it would
        // be one anyone who can write it may change under the VM.
        let [part] = parts(&store).try_into().unwrap();
        std::fs::remove_file(&part).unwrap();
        if link {
            std::os::unix::fs::symlink(&outside, &part).unwrap();
        } else {
            std::fs::copy(&outside, &part).unwrap();
        }
        let err = ferry_migrate::error_chain(&store.finish(incoming).unwrap_err());
        assert!(err.contains("'data'") && err.contains("replaced"), "{err}");
        // Nothing of it is left in the store, and the file elsewhere is untouched.
        assert!(parts(&store).is_empty(), "link {link}");
        assert!(std::fs::symlink_metadata(stored(&store, &o)).is_err());
        assert!(store.find(&o).is_none());
        assert_eq!(std::fs::read(&outside).unwrap(), content);
    }
}

#[test]
fn damaged_store_files_are_not_copies_and_a_receive_replaces_them() {
    let (_d, store) = setup("damaged");
    let content: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let o = offer("model", &content);
    let path = stored(&store, &o);
    let mut other = content.clone();
    other[123_456] ^= 1;
    let damaged: [(&str, Vec<u8>); 4] = [
        // Truncated (a disk that filled, a crash before the data reached it).
        ("truncated", content[..100_000].to_vec()),
        // Its space allocated, its bytes never written (a crash after the rename).
        ("zeroes", vec![0u8; content.len()]),
        // One bit flipped: the size right, the content not.
        ("flipped", other),
        // Longer: the content, then more.
        ("longer", [content.as_slice(), b"more"].concat()),
    ];
    for (how, bytes) in damaged {
        std::fs::write(&path, &bytes).unwrap();
        assert!(store.find(&o).is_none(), "{how}");
        receive_and_keep(&store, &o, &content);
        assert_eq!(std::fs::read(&path).unwrap(), content, "{how}");
        assert_eq!(store.find(&o).unwrap().info().path, path, "{how}");
    }
    // Neither a folder nor a FIFO by that name is a copy, nor does either hang a look.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    assert!(store.find(&o).is_none());
    std::fs::remove_dir(&path).unwrap();
    ferry_testdata::make_fifo(&path);
    assert!(store.find(&o).is_none());
    // Received, the file takes the name from the FIFO.
    receive_and_keep(&store, &o, &content);
    assert_eq!(store.find(&o).unwrap().info().path, path);
}

#[test]
fn a_file_changed_under_the_store_after_it_was_found_is_refused_when_checked() {
    let (_d, store) = setup("changed");
    let content = vec![9u8; 10_000];
    let o = offer("data", &content);
    receive_and_keep(&store, &o, &content);
    let found = store.find(&o).unwrap();
    found.check_unchanged().unwrap();
    // Changed in place (the same size): caught before its hash is offered again.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(stored(&store, &o))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", 5_000).unwrap();
    assert!(found.check_unchanged().is_err());
    // Truncated: a read past its end fails, never gives other bytes.
    file.set_len(5_000).unwrap();
    assert!(found.read_at(6_000, &mut [0u8; 16]).is_err());
    assert!(store.find(&o).is_none());
}

#[test]
fn a_link_in_place_of_the_daemons_lock_is_refused_and_not_followed() {
    let (d, store) = setup("lock-link");
    // In a store folder someone else could write to (the default is under /var/tmp),
    // a link where the lock goes would have the daemon, often root, create a file
    // wherever it leads.
    let target = d.join("created-through-the-link");
    std::os::unix::fs::symlink(&target, store.dir().join(".ferry-daemon.lock")).unwrap();
    let err = FileStore::hold(store.dir()).unwrap_err();
    assert!(err.to_string().contains(".ferry-daemon.lock"), "{err}");
    assert!(
        std::fs::symlink_metadata(&target).is_err(),
        "created through the link"
    );
}
