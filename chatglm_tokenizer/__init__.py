from .tokenizer import (CHATGLM2_SHA256, CHATGLM2_VOCAB_SIZE, ENV_VAR, HUB_REPO, Tokenizer, TokenizerNotFound,
                        file_sha256, find_tokenizer_model, load_tokenizer, train_sentencepiece)
