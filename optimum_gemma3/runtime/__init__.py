"""Running a compiled folder: one rank's programs and weights (`rank`), the processes of a
tensor-parallel model (`pool`), the host-side head (`head`), the whole model behind one
call (`engine`), and transformers' token loop over it (`logits`, `selection`, `loop`)."""
