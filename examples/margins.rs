use kvgear::backend::cpu::Cpu;
use kvgear::model::llama::{DeviceWeights, Logits, Session};
use kvgear::model::Model;
fn main() {
    let m = Model::load(&kvgear::fetch::default_model_path().unwrap()).unwrap();
    let prompt = std::env::args().nth(1).unwrap();
    let toks = m.tokenizer.encode(&prompt, true).unwrap();
    println!("{} tokens", toks.len());
    for b in [Cpu::fast(), Cpu::reference()] {
        let dw = DeviceWeights::new(&b, &m.weights).unwrap();
        let mut s = Session::new(&b, &m.config, &dw, 512, 64).unwrap();
        let l = s.forward(&toks, Logits::Last).unwrap().to_vec();
        let mut idx: Vec<usize> = (0..l.len()).collect();
        idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
        for &i in &idx[..4] { print!("{:?}={:.4}  ", m.tokenizer.decode(&[i as u32]).unwrap(), l[i]); }
        println!();
    }
}
