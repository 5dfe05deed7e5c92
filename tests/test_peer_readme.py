"""Every code example of ``reformer_pytorch`` 1.4.4's README, as written there with only the import
changed (``reformer_pytorch`` -> ``reformer``) - plus, to run on a CPU in seconds: sizes shrunk
(every keyword kept), ``.cuda()`` dropped, and the shape comments checked with asserts. The
image -> caption example's pretrained ResNet (a download) is replaced by features of the shape
it gives. The README's table "reformer_pytorch examples" lists them.
"""

import torch


def test_readme_reformer_lm():
    # should fit in ~ 5gb - 8k tokens

    import torch

    from reformer import ReformerLM

    model = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 1024
        depth=8,  # 12
        max_seq_len=512,  # 8192
        heads=8,
        lsh_dropout=0.1,
        ff_dropout=0.1,
        post_attn_dropout=0.1,
        layer_dropout=0.1,  # layer dropout from 'Reducing Transformer Depth on Demand' paper
        causal=True,  # auto-regressive or not
        bucket_size=64,  # average size of qk per bucket, 64 was recommended in paper
        n_hashes=4,  # 4 is permissible per author, 8 is the best but slower
        emb_dim=32,  # 128  # embedding factorization for further memory savings
        dim_head=16,  # 64  # be able to fix the dimension of each head
        ff_chunks=200,  # number of chunks for feedforward layer, make higher if there are memory issues
        attn_chunks=8,  # process lsh attention in chunks, only way for memory to fit when scaling to 16k tokens
        num_mem_kv=16,  # 128  # persistent learned memory key values, from all-attention paper
        full_attn_thres=128,  # 1024  # use full attention if context length is less than set value
        reverse_thres=128,  # 1024  # turn off reversibility for 2x speed for sequence lengths shorter or equal
        use_scale_norm=False,  # use scale norm from 'Transformers without tears' paper
        use_rezero=False,  # remove normalization and use rezero from 'ReZero is All You Need'
        one_value_head=False,  # use one set of values for all heads from 'One Write-Head Is All You Need'
        weight_tie=False,  # tie parameters of each layer for no memory per additional depth
        weight_tie_embedding=False,  # use token embedding for projection of output, some papers report better results
        n_local_attn_heads=2,  # many papers suggest mixing local attention heads aids specialization
        pkm_layers=(4, 7),  # specify layers to use product key memory
        pkm_num_keys=32,  # 128  # defaults to 128, but can be increased to 256 or 512 as memory allows
        use_full_attn=False,  # only turn on this flag to override and turn on full attention for all lengths
    )

    x = torch.randint(0, 256, (1, 512)).long()
    y = model(x)  # (1, 8192, 20000)
    assert y.shape == (1, 512, 256)


def test_readme_reformer():
    # should fit in ~ 5gb - 8k embeddings

    import torch

    from reformer import Reformer

    model = Reformer(
        dim=32,  # 512
        depth=2,  # 12
        heads=8,
        lsh_dropout=0.1,
        causal=True,
    )

    x = torch.randn(1, 5000, 32)  # (1, 8192, 512): longer than any default limit, not a bucket multiple
    y = model(x)  # (1, 8192, 512)
    assert y.shape == (1, 5000, 32)


def test_readme_lsh_self_attention():
    import torch

    from reformer import LSHSelfAttention

    attn = LSHSelfAttention(dim=128, heads=8, bucket_size=64, n_hashes=8, causal=False)

    x = torch.randn(2, 1024, 128)  # (10, 1024, 128)
    y = attn(x)  # (10, 1024, 128)
    assert y.shape == (2, 1024, 128)


def test_readme_lsh_attention():
    import torch

    from reformer import LSHAttention

    attn = LSHAttention(bucket_size=64, n_hashes=16, causal=True)

    qk = torch.randn(2, 1024, 128)  # (10, 1024, 128)
    v = torch.randn(2, 1024, 128)

    out, attn, buckets = attn(qk, v)  # (10, 1024, 128)
    # attn contains the unsorted attention weights, provided return_attn is set to True (costly otherwise)
    # buckets will contain the bucket number (post-argmax) of each token of each batch
    assert out.shape == (2, 1024, 128) and buckets.shape == (2, 16, 1024)


def test_readme_masking():
    import torch

    from reformer import ReformerLM

    CONTEXT_LEN = 128  # 512
    SEQ_LEN = 1024  # 8192

    model = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 1024
        depth=1,
        max_seq_len=SEQ_LEN,
        ff_chunks=8,
        causal=True,
    )

    c = torch.randn(1, CONTEXT_LEN, 64)
    x = torch.randint(0, 256, (1, SEQ_LEN)).long()

    i_mask = torch.ones(1, SEQ_LEN).bool()
    c_mask = torch.ones(1, CONTEXT_LEN).bool()

    y = model(x, keys=c, input_mask=i_mask, context_mask=c_mask)
    # masking done correctly in LSH attention
    assert y.shape == (1, SEQ_LEN, 256)


def test_readme_axial_positions():
    import torch

    from reformer import ReformerLM

    model = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 1024
        depth=2,  # 12
        max_seq_len=1024,  # 8192
        ff_chunks=8,
        attn_chunks=2,
        causal=True,
        axial_position_emb=True,  # set this to True
        axial_position_shape=(16, 64),  # (128, 64): the shape must multiply up to the max_seq_len
    )

    x = torch.randint(0, 256, (1, 1024)).long()
    y = model(x)  # (1, 8192, 20000)
    assert y.shape == (1, 1024, 256)


def test_readme_seq2seq_with_keys():
    import torch

    from reformer import ReformerLM

    DE_SEQ_LEN = 512  # 4096
    EN_SEQ_LEN = 512  # 4096

    encoder = ReformerLM(
        num_tokens=256,  # 20000
        emb_dim=32,  # 128
        dim=64,  # 1024
        depth=2,  # 12
        heads=8,
        max_seq_len=DE_SEQ_LEN,
        fixed_position_emb=True,
        return_embeddings=True,  # return output of last attention layer
    )

    decoder = ReformerLM(
        num_tokens=256,  # 20000
        emb_dim=32,  # 128
        dim=64,  # 1024
        depth=2,  # 12
        heads=8,
        max_seq_len=EN_SEQ_LEN,
        fixed_position_emb=True,
        causal=True,
    )

    x = torch.randint(0, 256, (1, DE_SEQ_LEN)).long()
    yi = torch.randint(0, 256, (1, EN_SEQ_LEN)).long()

    enc_keys = encoder(x)  # (1, 4096, 1024)
    yo = decoder(yi, keys=enc_keys)  # (1, 4096, 20000)
    assert enc_keys.shape == (1, DE_SEQ_LEN, 64) and yo.shape == (1, EN_SEQ_LEN, 256)


def test_readme_image_to_caption():
    import torch

    from reformer import Reformer, ReformerLM

    SEQ_LEN = 512  # 4096

    encoder = Reformer(
        dim=64,  # 512
        depth=2,  # 6
        heads=8,
        max_seq_len=4096,
    )

    decoder = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 512
        depth=2,  # 6
        heads=8,
        max_seq_len=SEQ_LEN,
        causal=True,
    )

    yi = torch.randint(0, 256, (1, SEQ_LEN)).long()

    visual_emb = torch.randn(1, 64, 32, 32)  # resnet(x): the first layers of a ResNet-50 on (1, 3, 512, 512)
    b, c, h, w = visual_emb.shape
    visual_emb = visual_emb.view(1, c, h * w).transpose(1, 2)  # nchw to nte

    enc_keys = encoder(visual_emb)
    yo = decoder(yi, keys=enc_keys)  # (1, 4096, 20000)
    assert yo.shape == (1, SEQ_LEN, 256)


def test_readme_encoder_decoder():
    import torch

    from reformer import ReformerEncDec

    DE_SEQ_LEN = 128  # 4096
    EN_SEQ_LEN = 16  # 4096

    enc_dec = ReformerEncDec(
        dim=64,  # 512
        enc_num_tokens=256,  # 20000
        enc_depth=2,  # 6
        enc_max_seq_len=DE_SEQ_LEN,
        dec_num_tokens=256,  # 20000
        dec_depth=2,  # 6
        dec_max_seq_len=EN_SEQ_LEN,
    )

    train_seq_in = torch.randint(0, 256, (1, DE_SEQ_LEN)).long()
    train_seq_out = torch.randint(0, 256, (1, EN_SEQ_LEN)).long()
    input_mask = torch.ones(1, DE_SEQ_LEN).bool()

    loss = enc_dec(train_seq_in, train_seq_out, return_loss=True, enc_input_mask=input_mask)
    loss.backward()
    # learn

    # evaluate with the following
    eval_seq_in = torch.randint(0, 256, (1, DE_SEQ_LEN)).long()
    eval_seq_out_start = torch.tensor([[0.0]]).long()  # assume 0 is id of start token
    samples = enc_dec.generate(
        eval_seq_in, eval_seq_out_start, seq_len=EN_SEQ_LEN - 1, eos_token=1
    )  # assume 1 is id of stop token
    print(samples.shape)  # (1, <= 1024) decode the tokens
    assert samples.shape[0] == 1 and 1 <= samples.shape[1] <= EN_SEQ_LEN - 1


def test_readme_custom_feedforward():
    import torch
    from torch import nn

    from reformer import ReformerLM

    model = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 512
        depth=2,  # 6
        max_seq_len=1024,  # 8192
        ff_chunks=8,
        ff_dropout=0.1,
        ff_mult=6,
        ff_activation=nn.LeakyReLU,
        ff_glu=True,  # use GLU in feedforward, from paper 'GLU Variants Improve Transformer'
    )

    x = torch.randint(0, 256, (1, 1024)).long()
    y = model(x)  # (1, 8192, 20000)
    assert y.shape == (1, 1024, 256)


def test_readme_recorder():
    import torch

    from reformer import Recorder, Reformer

    model = Reformer(
        dim=64,  # 512
        depth=2,  # 12
        max_seq_len=512,  # 8192
        heads=8,
        lsh_dropout=0.1,
        causal=True,
    )

    model = Recorder(model)

    x = torch.randn(1, 512, 64)  # (1, 8192, 512)
    y = model(x)

    model.recordings[0]  # a list of attention weights and buckets for the first forward pass
    assert len(model.recordings[0]) == 2 and model.recordings[0][0]["attn"].shape == (1, 8, 512, 512)

    model.turn_off()  # stop recording
    model.turn_on()  # start recording
    model.clear()  # clear the recordings

    model = model.eject()  # recover the original model and remove all listeners
    assert isinstance(model, Reformer) and y.shape == (1, 512, 64)


def test_readme_autopadder():
    import torch

    from reformer import Autopadder, ReformerLM

    model = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 1024
        depth=2,  # 12
        max_seq_len=1024,  # 8192
        heads=8,
        lsh_dropout=0.1,
        causal=True,
        bucket_size=63,  # odd bucket size
        num_mem_kv=77,  # odd memory key length
    )

    model = Autopadder(model)

    SEQ_LEN = 777  # 7777 # odd sequence length
    keys = torch.randn(1, 137, 64)  # odd keys length

    x = torch.randint(0, 256, (1, SEQ_LEN)).long()
    y = model(x, keys=keys)  # (1, 7777, 20000)
    assert y.shape == (1, SEQ_LEN, 256)


def test_readme_training_wrapper():
    import torch
    from torch import randint

    from reformer import ReformerLM
    from reformer.generative_tools import TrainingWrapper

    model = ReformerLM(
        num_tokens=256,  # 20000
        dim=64,  # 1024
        depth=2,  # 12
        max_seq_len=1024,  # 4096
        lsh_dropout=0.1,
        causal=True,
        full_attn_thres=256,  # 1024
    )

    # 0 is used for padding and no loss to be calculated on it
    model = TrainingWrapper(model, ignore_index=0, pad_value=0)

    # the wrapper can handle evenly packed sequences
    x_train = randint(0, 256, (3, 357))

    # or if you have a list of uneven sequences, it will be padded for you
    x_train = [randint(0, 256, (120,)), randint(0, 256, (253,)), randint(0, 256, (446,))]  # (846)

    # when training, set return_loss equal to True
    model.train()
    loss = model(x_train, return_loss=True)
    loss.backward()

    # when evaluating, just use the generate function, which will default to top_k sampling with temperature of 1.
    initial = torch.tensor([[0]]).long()  # assume 0 is start token
    sample = model.generate(
        initial, 24, temperature=1.0, filter_thres=0.9, eos_token=1
    )  # (100) assume end token is 1, or omit and it will sample up to 100
    print(sample.shape)  # (1, <=100) token ids
    assert sample.shape[0] == 1 and 1 <= sample.shape[1] <= 24


def test_enwik8_simple_generate_decodes_a_1d_prompt():
    """The peer's examples/enwik8_simple/train.py samples from a 1-D prompt and decodes the 1-D
    result directly (``decode_tokens(sample)``)."""
    from reformer import ReformerLM
    from reformer.generative_tools import TrainingWrapper

    model = TrainingWrapper(ReformerLM(num_tokens=256, dim=32, depth=1, max_seq_len=256, causal=True))
    inp = torch.randint(0, 256, (64,))
    sample = model.generate(inp, 16)
    assert sample.shape == (16,)
    assert "".join(chr(max(32, int(t))) for t in sample)  # decode_tokens
