use candle_core::{Device, Tensor};
fn main() {
    let lm = scalpel_models::loader::load("smollm2-135m", &Device::Cpu).unwrap();
    let m = &lm.model;
    let ids: Vec<u32> = (0..512u32).map(|i| 100 + (i * 7919) % 40000).collect();
    let t = Tensor::from_vec(ids, (4, 128), &Device::Cpu).unwrap();
    m.forward(&t).unwrap();
    for _ in 0..3 {
        let s = std::time::Instant::now();
        m.forward(&t).unwrap();
        println!("fwd {:.1} tok/s", 512.0 / s.elapsed().as_secs_f64());
    }
    for _ in 0..2 {
        let s = std::time::Instant::now();
        let _ = m.run_with_cache(&t, |p| p.is_residual()).unwrap();
        println!("resid {:.1} tok/s", 512.0 / s.elapsed().as_secs_f64());
    }
}
