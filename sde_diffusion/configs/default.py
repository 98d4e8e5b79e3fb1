"""The base configuration every named config starts from (score_sde's layout).

Sections: ``training`` (SDE, loss, loop), ``sampling`` (sampler and its options), ``data``, ``model`` (network and
SDE parameters, as in score_sde), ``optim``, ``eval``; top level: ``seed``, ``deterministic``, ``device``.
"""
import ml_collections


def get_default_config():
    config = ml_collections.ConfigDict()
    config.name = "default"
    config.seed = 42
    config.deterministic = False      # torch.use_deterministic_algorithms (+ cuDNN deterministic)
    config.device = "auto"            # auto = cuda when available, else cpu

    # speed and parallelism (issue 17); every key may change on resume.  Measure with experiments/throughput.py
    config.compute = compute = ml_collections.ConfigDict()
    compute.threads = 1               # torch intra-op threads per process (0 = PyTorch's default, one per core); 1 was
    #                                   fastest on a 2-core CPU (3x vs 2 threads when busy), set at start-up of
    #                                   train / sample / eval
    compute.grad_accum = 1            # micro-batches per rank per update: the global batch training.batch_size is
    #                                   split into world_size * grad_accum micro-batches (must divide it)
    compute.autocast = "none"         # none | bf16 (network forward in training under torch.autocast, CPU or CUDA)
    #                                   | fp16 (CUDA only: float16 autocast with a torch.amp.GradScaler)
    #                                   | auto (bf16 where the device computes it natively: AVX512-BF16 / AMX CPUs,
    #                                     bf16-capable GPUs; float32 elsewhere)
    compute.adam_impl = "auto"        # auto (fused where supported, else foreach) | fused | foreach | loop
    compute.ema_foreach = True        # EMA update with torch._foreach_lerp_ (same numbers as the per-tensor loop)
    compute.channels_last = False     # image networks: NHWC weights and inputs (ignored for 1-D / 2-D data)
    compute.compile = False           # torch.compile of the score network in training (opt-in: slow to compile)
    compute.dist_timeout = 1800       # seconds a torchrun rank waits in a collective before the group gives up
    compute.dataloader_workers = 0    # background threads assembling the next batches (in-memory data: index, flip,
    #                                   dequantise; the same batches as in the loop); 0 = in the loop
    compute.pin_memory = True         # page-locked batches for asynchronous host -> GPU copies (CUDA only)
    compute.cudnn_benchmark = True    # cuDNN autotuning for the fixed training shapes (CUDA only; off when
    #                                   deterministic = True)
    compute.tf32 = True               # TF32 matmuls / convolutions on Ampere+ GPUs (CUDA only)

    config.training = training = ml_collections.ConfigDict()
    training.sde = "vp"               # vp | subvp | ve (any name sde_diffusion.sdes.get_sde knows)
    training.loss = "dsm"             # dsm (continuous time) | ddpm (discrete eps-loss, VP) | smld (discrete, VE)
    #                                   | fm (conditional flow matching) | edm (Karras et al. 2022)
    training.weighting = "uniform"    # dsm only: uniform (lambda = sigma^2) | likelihood (lambda = g^2)
    training.reduce = "mean"          # mean | sum over data dimensions (then mean over the batch)
    training.eps = 1e-5               # t ~ U(eps, T)
    training.batch_size = 128
    training.n_iters = 1_300_001
    training.log_freq = 50
    training.checkpoint_freq = 10_000
    training.keep_checkpoints = 3     # keep the last k checkpoints
    training.snapshot_freq = 50_000   # sample grid to TensorBoard every this many steps (0 = never)
    training.snapshot_sampling = True
    training.snapshot_num_samples = 64
    training.p_uncond = 0.0           # probability of dropping labels to the null label (classifier-free guidance)
    training.fm_ot = False            # fm: pair noise and data by minibatch optimal transport (linear_sum_assignment)
    training.P_mean = -1.2            # edm: ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)
    training.P_std = 1.2
    training.vlb_weight = 0.001       # ddpm with model.learned_variance: lambda of Improved DDPM's L_simple + lambda L_vlb
    training.progress = True          # tqdm progress bar (only drawn on a terminal)

    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.method = "pc"            # any of solvers.available()
    sampling.num_steps = 1000
    sampling.eps = 1e-5               # last positive time of the grid; with denoise the grid then lands on x0_hat
    sampling.schedule = "uniform"
    sampling.denoise = True
    sampling.num_samples = 64
    sampling.batch_size = 64
    sampling.seed = 0
    sampling.autocast = "none"        # none | bf16 (every network call under torch.autocast, CPU or CUDA; the solver's
    #                                   arithmetic stays float32) | fp16 (CUDA only)
    sampling.class_label = -1         # conditional models: -1 cycles through the classes, else this label
    # the sampler's and the schedule's own options, e.g. --config.sampling.options.order=3 for dpm_solver or
    # --config.sampling.options.rho=5 for the edm schedule; validated against their signatures (an unknown option is
    # an error).  The flat keys below are the wave-1 samplers' options, passed when the method accepts them.
    sampling.options = ml_collections.ConfigDict()
    # sampler options (only those the chosen method accepts are passed to it)
    sampling.predictor = "reverse_diffusion"
    sampling.corrector = "langevin"
    sampling.snr = 0.16
    sampling.n_corrector_steps = 1
    sampling.solver = "heun"          # ode: euler | heun | rk4 (adaptive RK45 is sampling.method = rk45)
    sampling.rtol = 1e-5              # adaptive methods (rk45)
    sampling.atol = 1e-5
    sampling.variance = "posterior"   # ancestral: posterior | beta | learned | auto (learned if the model has it)
    sampling.eta = 0.0                # ddim
    # controllable generation (issue 8)
    sampling.guidance = "none"        # none | cfg (classifier-free) | classifier
    sampling.guidance_scale = 1.0     # cfg: w in s_u + w (s_c - s_u) (w = 1: conditional); classifier: scale
    sampling.classifier_workdir = ""  # classifier guidance: workdir of a trained time-dependent classifier
    sampling.task = "generate"        # generate | inpaint | colorize
    sampling.image = ""               # inpaint/colorize: path to an image file (PNG/NPY) ...
    sampling.dataset_index = -1       # ... or the index of a test-set image
    sampling.mask = "right_half"      # inpaint: right_half | left_half | top_half | bottom_half | center | PATH (.npy/.png)
    sampling.inpaint_data_var = 0.5   # inpaint/colorize: per-pixel data variance of the isotropic Tweedie covariance

    # --mode eval (sde_diffusion/run/evaluate.py): per checkpoint the test loss, bits/dim, samples and their quality;
    # resumable, results in <workdir>/eval/ and TensorBoard (eval/...)
    config.eval = evaluate = ml_collections.ConfigDict()
    evaluate.batch_size = 256         # test loss
    evaluate.seed = 1234              # test loss noise, dequantisation noise and Hutchinson probes
    evaluate.num_samples = 10_000     # toy data: size of the (fresh) test set
    evaluate.checkpoint = -1          # -1 = every checkpoint in the workdir, else that step (--checkpoint wins)
    evaluate.progress = True          # tqdm progress bars (only drawn on a terminal)
    # bits/dim of test data through the probability-flow ODE (sde_diffusion.likelihood.nll)
    evaluate.enable_bpd = True
    evaluate.bpd_num_examples = -1    # the first n test examples (-1 = the whole test split)
    evaluate.bpd_batch_size = 64
    evaluate.bpd_method = "hutchinson"  # hutchinson | exact (divergence by D autograd passes: small D only)
    evaluate.bpd_num_probes = 1       # hutchinson: probes per example
    evaluate.bpd_probe = "rademacher"  # rademacher | gaussian
    evaluate.bpd_solver = "rk45"      # rk45 (adaptive, bpd_rtol/bpd_atol) | euler | heun | rk4 (bpd_num_steps)
    evaluate.bpd_rtol = 1e-5
    evaluate.bpd_atol = 1e-5
    evaluate.bpd_num_steps = 100
    evaluate.bpd_eps = 1e-5           # the ODE starts at t = eps: what is measured is the model's p_eps
    evaluate.bpd_dequantize = "auto"  # auto | uniform ((k+U)/L, score_sde's) | uniform_centered | none; auto: uniform
    #                                   for 256-level or dequantisation-trained data, uniform_centered for coarser
    #                                   data (digits: bins centred on the 17 levels the model saw); toy data: none
    evaluate.bpd_num_levels = 0       # levels per dimension (0 = the dataset's: cifar10 256, digits 17)
    evaluate.bpd_num_repeats = 1      # dequantisation draws per example (the bpd averages over them)
    # variational bounds (sde_diffusion.elbo): DDPM's discrete bound (VP only) for the beta / posterior (/ learned)
    # reverse variances, and the continuous-time bound (VDM; Song et al. 2021b), with their terms
    evaluate.enable_elbo = False
    evaluate.elbo_num_examples = -1   # the first n test examples (-1 = the whole test split)
    evaluate.elbo_batch_size = 64
    evaluate.elbo_num_steps = 0       # K levels of the DDPM chain (0 = all N; K < N: Improved DDPM's even striding)
    evaluate.elbo_num_t = 32          # continuous bound: draws of t per example (0 = no continuous bound)
    evaluate.elbo_importance = "logsnr"  # logsnr (t with density ~ -dlambda/dt, i.e. lambda uniform) | uniform
    evaluate.elbo_clip_denoised = False  # clamp x0_hat to the data range in the reverse means and the decoder
    # samples drawn with config.sampling.* (method, num_steps, ...) and their quality
    evaluate.enable_sampling = True
    evaluate.num_generated = 1000     # samples per checkpoint (FID is usually quoted for 50_000)
    evaluate.generate_batch_size = 0  # 0 = sampling.batch_size
    evaluate.sample_seed = 0          # batch i of the samples uses seed f(sample_seed, i): resumable, reproducible
    evaluate.sample_metrics = "auto"  # auto (digits -> digits, cifar10 -> inception, toy -> none) | digits |
    #                                   inception | none
    evaluate.inception_weights = ""   # inception metrics: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's)
    evaluate.fid_reference = "train"  # inception metrics: the data split the samples are compared with
    evaluate.fid_preprocess = "pytorch_fid"  # inception metrics' convention: pytorch_fid (pytorch-fid's bilinear resize
    #                                   of [0, 1] floats) | tf (the TF graph's resize of 8-bit images, as torch-fidelity
    #                                   and clean-fid's legacy_tensorflow; KID subsets and IS folds as torch-fidelity's)
    evaluate.kid_subsets = 100
    evaluate.kid_subset_size = 1000
    evaluate.is_splits = 10
    evaluate.enable_prc = True        # inception metrics: precision / recall (Kynkäänniemi et al. 2019) of pool3
    evaluate.prc_neighborhood = 3     # k of the k-NN balls (the paper's and torch-fidelity's 3)

    config.data = data = ml_collections.ConfigDict()
    data.dataset = "cifar10"          # cifar10 | digits | toy
    data.name = ""                    # toy: ring | moons | checkerboard | bimodal | trimodal
    data.root = "data"
    data.download = False
    data.image_size = 32
    data.num_channels = 3
    data.dim = 3 * 32 * 32
    data.centered = True              # scale to [-1, 1] (else [0, 1])
    data.random_flip = True
    data.uniform_dequantization = False

    config.model = model = ml_collections.ConfigDict()
    # where --mode sample takes the model from (issue 16): ours (the workdir's checkpoint) | export (an export folder
    # written by --mode export: safetensors EMA weights + config.json) | diffusers (a diffusers UNet2DModel folder with
    # its scheduler config, sde_diffusion.external); model.path is the folder for export / diffusers
    model.source = "ours"
    model.path = ""
    # latent diffusion (sde_diffusion.autoencoder): the workdir of a --mode train_autoencoder run ("" = diffuse in data
    # space); the score network then works on its scaled latents (the config's `autoencoder` section gives their
    # shape), sampling decodes, eval measures in data space.  latent_sample: encode a posterior sample, not the mean
    model.autoencoder_workdir = ""
    model.latent_sample = False
    model.name = "unet"
    model.parameterization = "noise"  # noise | score | direct | x0 | v | velocity (see sde_diffusion.networks.utils)
    model.precond = "none"            # none | edm (EDM's c_skip/c_out/c_in/c_noise wrapper; needs parameterization x0)
    model.sigma_data = 0.5            # EDM: data std of the preconditioning and of the edm loss's weighting
    model.num_classes = 0             # > 0: class-conditional (label embedding with num_classes + 1 rows)
    model.learned_variance = False    # Improved DDPM: extra outputs v, Sigma = exp(v log beta + (1-v) log beta~); ddpm loss
    model.ema_rate = 0.9999
    model.nf = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attn_resolutions = (16,)
    model.dropout = 0.1
    model.resblock_type = "ddpm"
    model.skip_rescale = True
    model.resamp_with_conv = True
    model.nonlinearity = "swish"
    model.embedding_type = "positional"
    model.time_scale = 999.0          # positional embedding of time_scale * t (t in [0, 1] -> DDPM's step index)
    model.fourier_scale = 16.0
    model.init_scale = 0.0
    model.num_layers = 4              # mlp only
    # SDE parameters (score_sde keeps them under model.*)
    model.beta_min = 0.1
    model.beta_max = 20.0
    model.num_scales = 1000
    model.sigma_min = 0.01
    model.sigma_max = 50.0

    config.optim = optim = ml_collections.ConfigDict()
    optim.optimizer = "adam"          # adam | adamw
    optim.lr = 2e-4
    optim.beta1 = 0.9
    optim.beta2 = 0.999
    optim.eps = 1e-8
    optim.weight_decay = 0.0
    optim.warmup = 5000
    optim.grad_clip = 1.0
    return config
