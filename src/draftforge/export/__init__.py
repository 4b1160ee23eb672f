"""draftforge.export"""
