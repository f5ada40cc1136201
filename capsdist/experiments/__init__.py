"""What is done with trained runs: evaluation, learning curves, attacks, and the paper's experiments beyond accuracy,
each comparing trained runs (capsules against the CNN baselines).

evaluate      a run's checkpoint on a split (launch/evaluate.py); open_run rebuilds a run's model and data
curves        learning curves from run directories (launch/plot_runs.py)
attacks       FGSM and BIM in pixel space, untargeted and targeted
viewpoints    smallNORB novel viewpoints: familiar and novel accuracy of two runs at matched familiar accuracy
adversarial   FGSM and BIM (attacks): accuracy and attack success rate against epsilon, W&B plots
output        what both experiments write: JSON, a Markdown table and a PNG, atomically
"""
