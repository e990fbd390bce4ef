# Smaug's lambda (Pal et al., 2024): the default of StepwiseDPOConfig.dpop_lambda and of `stepdpo loop --dpop-lambda`,
# which both refuse another value without step_loss dpop. Here, not in losses.py, so the loop's options load no torch.
DPOP_LAMBDA = 50.0
