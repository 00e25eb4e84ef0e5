"""Flax NNX models the lab times: MLP, SwiGLU, conv stack, ResNet, decoder, MoE.

Each letter in an array name has one meaning in every module here. For example, `x_BxLxD`
is [batch, length, d_model]. The key follows.

    B batch             L sequence length      S cache slots per sequence (max_len)
    D model dim         F hidden dim of an MLP or expert
    V output classes (vocab, or ResNet classes)
    N query heads       K kv heads             Q query heads per kv head (N = K·Q)
    H head dim          R rows of the merged B·K cache axis
    E experts           C slots per expert (capacity)
    G routing groups    M tokens per routing group
    A choices per token (top-k)                 T tokens in one call (G·M)
    P assignments (T·A) O generated tokens per sequence
    I, J image height and width                 Z channels
    U a ResNet block's planes

Each module uses a subset and lists it at its top.
"""
