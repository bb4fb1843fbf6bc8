use saphyr::{LoadableYamlNode, MarkedYaml};
fn main() {
    let text = musubi_controller::generate::generate(10_000, 5);
    let t = std::time::Instant::now();
    let docs = MarkedYaml::load_from_str(&text).expect("yaml");
    println!("saphyr load: {:?} ({} docs)", t.elapsed(), docs.len());
    let t = std::time::Instant::now();
    let p = musubi_controller::intent::parse::parse_str("g.yaml", &text);
    println!("full parse: {:?} {}", t.elapsed(), p.intent.sites.len());
}
