fastdiff eval --checkpoint pretrained:mnist --sampler ddim --steps 50 --seed 50000
