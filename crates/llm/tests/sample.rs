//! The sampler: greedy, determinism, top-k/top-p, distribution, validation.

use ferry_llm::{DrawScratch, Sampler, SamplerConfig, SamplerError};

fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k,
        top_p,
        seed,
    }
}

fn logits(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
        })
        .collect()
}

#[test]
fn greedy_takes_the_first_maximum() {
    let mut scratch = DrawScratch::default();
    let mut s = Sampler::new(SamplerConfig::default()).unwrap();
    assert_eq!(s.sample(&[0.0, 2.0, 1.0, 2.0], &mut scratch), 1);
    assert_eq!(s.sample(&[f32::NAN, -5.0, f32::NAN], &mut scratch), 1);
    assert_eq!(s.sample(&[], &mut scratch), 0);
    assert_eq!(s.step(), 0);
    // Temperature sampling falls back to greedy where a softmax cannot weigh.
    let mut s = Sampler::new(cfg(1.0, 0, 1.0, 1)).unwrap();
    assert_eq!(
        s.sample(&[0.0, f32::INFINITY, 1.0, f32::INFINITY], &mut scratch),
        1
    );
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 3], &mut scratch), 0);
    assert_eq!(s.sample(&[f32::NAN, f32::NAN], &mut scratch), 0);
    // top_k 1 and a tiny top_p are greedy too (ties broken by the lower id).
    let l = logits(1000, 7);
    let best = Sampler::new(SamplerConfig::default())
        .unwrap()
        .sample(&l, &mut scratch);
    let mut k1 = Sampler::new(cfg(1.5, 1, 1.0, 3)).unwrap();
    let mut tiny = Sampler::new(cfg(1.5, 0, 1e-9, 3)).unwrap();
    // OpenAI's top_p 0: the most likely token alone.
    let mut p0 = Sampler::new(cfg(1.5, 0, 0.0, 3)).unwrap();
    for _ in 0..20 {
        assert_eq!(k1.sample(&l, &mut scratch), best);
        assert_eq!(tiny.sample(&l, &mut scratch), best);
        assert_eq!(p0.sample(&l, &mut scratch), best);
    }
    let mut tie = Sampler::new(cfg(1.0, 1, 1.0, 9)).unwrap();
    assert_eq!(tie.sample(&[0.0, 3.0, 1.0, 3.0], &mut scratch), 1);
}

#[test]
fn same_seed_same_tokens() {
    let mut scratch = DrawScratch::default();
    let l = logits(49152, 11);
    let mut run = |seed| {
        let mut s = Sampler::new(cfg(0.8, 40, 0.95, seed)).unwrap();
        (0..50)
            .map(|_| s.sample(&l, &mut scratch))
            .collect::<Vec<_>>()
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43));
    // Resuming from a step gives the same continuation.
    let mut s = Sampler::new(cfg(0.8, 40, 0.95, 42)).unwrap();
    s.set_step(25);
    let tail: Vec<_> = (0..25).map(|_| s.sample(&l, &mut scratch)).collect();
    assert_eq!(tail, a[25..]);
    // Only the top 40 ever come out.
    let mut order: Vec<u32> = (0..l.len() as u32).collect();
    order.sort_by(|&x, &y| l[y as usize].total_cmp(&l[x as usize]).then(x.cmp(&y)));
    assert!(a.iter().all(|t| order[..40].contains(t)));
}

#[test]
fn follows_the_softmax() {
    let mut scratch = DrawScratch::default();
    // Probabilities 1/2, 1/4, 1/8, 1/8 at temperature 1.
    let l = [
        0.0f32,
        -std::f32::consts::LN_2,
        -2.0 * std::f32::consts::LN_2,
        -2.0 * std::f32::consts::LN_2,
    ];
    let mut s = Sampler::new(cfg(1.0, 0, 1.0, 5)).unwrap();
    let n = 40000;
    let mut count = [0usize; 4];
    for _ in 0..n {
        count[s.sample(&l, &mut scratch) as usize] += 1;
    }
    for (c, p) in count.iter().zip([0.5, 0.25, 0.125, 0.125]) {
        let f = *c as f64 / n as f64;
        assert!((f - p).abs() < 0.01, "{count:?}");
    }
    // top_p 0.7 keeps the first two (0.5 < 0.7 <= 0.75): 2/3 and 1/3.
    let mut s = Sampler::new(cfg(1.0, 0, 0.7, 5)).unwrap();
    let mut count = [0usize; 4];
    for _ in 0..30000 {
        count[s.sample(&l, &mut scratch) as usize] += 1;
    }
    assert_eq!(count[2] + count[3], 0, "{count:?}");
    assert!(
        (count[0] as f64 / 30000.0 - 2.0 / 3.0).abs() < 0.015,
        "{count:?}"
    );
    // A high temperature flattens it.
    let mut s = Sampler::new(cfg(1000.0, 0, 1.0, 5)).unwrap();
    let mut count = [0usize; 4];
    for _ in 0..20000 {
        count[s.sample(&l, &mut scratch) as usize] += 1;
    }
    assert!(
        count
            .iter()
            .all(|&c| (c as f64 / 20000.0 - 0.25).abs() < 0.02),
        "{count:?}"
    );
}

#[test]
fn validates_the_config() {
    for t in [-0.1f32, f32::NAN, f32::INFINITY] {
        let e = Sampler::new(cfg(t, 0, 1.0, 0)).unwrap_err();
        assert!(matches!(e, SamplerError::Temperature(_)));
        assert!(e.to_string().contains("temperature"));
    }
    for p in [-0.01f32, -1.0, 1.01, f32::NAN] {
        assert!(matches!(
            Sampler::new(cfg(1.0, 0, p, 0)),
            Err(SamplerError::TopP(_))
        ));
    }
    assert!(Sampler::new(cfg(0.0, 0, 1.0, 0)).is_ok());
}

/// One draw of the sampler as its documentation defines it, written plainly (a sort by
/// comparisons, one `exp` at a time): the sampler's faster code must give its tokens.
fn reference_draw(c: SamplerConfig, draw: u64, logits: &[f32]) -> u32 {
    let mut best = None::<(usize, f32)>;
    for (i, &l) in logits.iter().enumerate() {
        if !l.is_nan() && best.is_none_or(|(_, m)| l > m) {
            best = Some((i, l));
        }
    }
    let Some((best, max)) = best.map(|(i, m)| (i as u32, m)) else {
        return 0;
    };
    if c.temperature <= 0.0 || !max.is_finite() {
        return best;
    }
    let mut cand: Vec<(u32, f32)> = (0..logits.len() as u32)
        .map(|i| (i, logits[i as usize]))
        .filter(|(_, l)| !l.is_nan())
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if c.top_k > 0 {
        cand.truncate(c.top_k);
    }
    let t = f64::from(c.temperature);
    let probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| ferry_abi::accel::math::exp((f64::from(l) - f64::from(max)) / t))
        .collect();
    let mut keep = probs.len();
    if c.top_p < 1.0 {
        let target = f64::from(c.top_p) * probs.iter().sum::<f64>();
        let mut acc = 0.0;
        keep = 1 + probs
            .iter()
            .position(|p| {
                acc += p;
                acc >= target
            })
            .unwrap_or(probs.len() - 1);
    }
    let mass: f64 = probs[..keep].iter().sum();
    // splitmix64 of seed + draw·γ.
    let mut z = c
        .seed
        .wrapping_add(draw.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
    let target = u * mass;
    let mut acc = 0.0;
    for (i, p) in probs[..keep].iter().enumerate() {
        acc += p;
        if target < acc {
            return cand[i].0;
        }
    }
    cand[keep - 1].0
}

#[test]
fn draws_are_those_of_the_plain_definition() {
    let mut scratch = DrawScratch::default();
    let wide = logits(49_152, 5);
    // Few distinct values: ties everywhere, broken by token id.
    let ties: Vec<f32> = logits(49_152, 6).iter().map(|l| l.round()).collect();
    let mut odd = logits(1_001, 7);
    odd[3] = f32::NAN;
    odd[10] = f32::NEG_INFINITY;
    odd[500] = -0.0;
    odd[501] = 0.0;
    let small = logits(257, 8);
    let mut draws = 0;
    for (name, l) in [
        ("wide", &wide),
        ("ties", &ties),
        ("odd", &odd),
        ("small", &small),
    ] {
        for (temperature, top_k, top_p) in [
            (0.8, 0, 1.0),
            (0.8, 0, 0.95),
            (1.5, 40, 0.9),
            (0.3, 300, 1.0),
            (1.0, 5_000, 0.5),
            (2.0, 0, 0.0),
        ] {
            let c = cfg(temperature, top_k, top_p, 77);
            let mut s = Sampler::new(c).unwrap();
            for draw in 1..=10 {
                let want = reference_draw(c, draw, l);
                assert_eq!(
                    s.sample(l, &mut scratch),
                    want,
                    "{name}, {c:?}, draw {draw}"
                );
                draws += 1;
            }
        }
    }
    assert_eq!(draws, 4 * 6 * 10);
}

#[test]
fn samplers_drawing_in_turn_in_one_scratch_draw_what_each_draws_alone() {
    // As a server's sequences do: each draw leaves the scratch as it ends (sorted, of
    // another length after a top-k draw), and the next one must not see it.
    let configs = [
        cfg(0.8, 0, 1.0, 1),
        cfg(1.5, 40, 0.9, 2),
        cfg(0.8, 0, 0.95, 3),
        cfg(0.3, 300, 1.0, 4),
    ];
    let inputs: Vec<Vec<f32>> = (0..8)
        .map(|i| logits(49_152 - 1_000 * i, 20 + i as u64))
        .collect();
    let alone: Vec<Vec<u32>> = configs
        .iter()
        .map(|&c| {
            let mut s = Sampler::new(c).unwrap();
            (inputs.iter())
                .map(|l| s.sample(l, &mut DrawScratch::default()))
                .collect()
        })
        .collect();
    let mut samplers: Vec<Sampler> = configs.iter().map(|&c| Sampler::new(c).unwrap()).collect();
    let mut shared = DrawScratch::default();
    let mut in_turn = vec![Vec::new(); configs.len()];
    for l in &inputs {
        for (s, drawn) in samplers.iter_mut().zip(&mut in_turn) {
            drawn.push(s.sample(l, &mut shared));
        }
    }
    assert_eq!(in_turn, alone);
    // The draws differ between samplers: the comparison could fail.
    assert!(alone.windows(2).any(|w| w[0] != w[1]));
}
