"""The paper's experiments beyond accuracy, each comparing trained runs (capsules against the CNN baselines).

viewpoints    smallNORB novel viewpoints: familiar and novel accuracy of two runs at matched familiar accuracy
adversarial   FGSM and BIM (capsdist.attacks): accuracy and attack success rate against epsilon, W&B plots
output        what both write: JSON, a Markdown table and a PNG, atomically
"""
