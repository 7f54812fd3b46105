//! Build (or verify) the default guest in the cache and print its paths.
fn main() {
    use vireo_guests::default_guest::{cache_dir, ensure, Options};
    let cache = cache_dir().expect("cache dir");
    match ensure(&cache, &Options::default()) {
        Ok(g) => println!(
            "kernel {}\ninitrd {}\ncmdline {}",
            g.kernel.display(),
            g.initrd.display(),
            g.cmdline
        ),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
